"""AWS integration for the parent: private keys from SSM or Secrets Manager, IMDSv2, doctor checks.

Every failure a user can fix becomes an :class:`AWSError` whose message says what to fix: the
parameter or secret that does not exist, the exact IAM permission (and resource ARN) a denied
call needs, missing credentials, an unreachable endpoint. botocore's own messages are kept as
the "AWS said" tail because they carry request details that help with support cases.

Key material never appears in a message, a log record or an exception chain: the only place the
secret string lives is the local variable that is decoded, and decode failures are re-raised
``from None`` with a message that describes the problem without quoting the value.

boto3 honours ``AWS_ENDPOINT_URL`` (and ``AWS_ENDPOINT_URL_<SERVICE>``), so tests and
VPC-endpoint setups need no parameter here; IMDS has its own endpoint setting, the same
``AWS_EC2_METADATA_SERVICE_ENDPOINT`` variable that botocore reads.
"""

from __future__ import annotations

import html
import http.client
import json
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    EndpointResolutionError,
    InvalidEndpointConfigurationError,
    InvalidIMDSEndpointError,
    InvalidRegionError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from wgvsock.core.crypto import KeyFormatError, key_from_base64
from wgvsock.safetext import error, prose, without_userinfo

__all__ = [
    "AWSError",
    "Check",
    "CloudWatchError",
    "Imds",
    "ImdsUnavailable",
    "InstanceIdentity",
    "check_credentials",
    "check_enclave_support",
    "check_instance_type",
    "check_put_metric_data",
    "cloudwatch_client",
    "doctor_checks",
    "is_aws_key_spec",
    "load_private_key",
    "parse_key_spec",
    "put_metric_data",
]

log = logging.getLogger(__name__)

KeySource = Literal["ssm", "secretsmanager"]

DEFAULT_IMDS_ENDPOINT = "http://169.254.169.254"
IMDS_ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
TOKEN_PATH = "/latest/api/token"  # noqa: S105 - a URL path, not a secret
IDENTITY_PATH = "/latest/dynamic/instance-identity/document"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"  # noqa: S105 - header name
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105 - header name
# A token is ~60 bytes and the identity document ~500: anything near this is not IMDS talking.
MAX_IMDS_BODY = 64 * 1024

# A doctor run or a service start should fail within seconds on a broken network, not hang for
# botocore's default 60 s per attempt. Retries stay as configured (AWS_MAX_ATTEMPTS etc.).
_CLIENT_CONFIG = Config(connect_timeout=5, read_timeout=10)

_DENIED_CODES = frozenset(
    {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "UnauthorizedAccess"}
)
# Codes meaning "these credentials are not accepted at all", as opposed to "not allowed to".
_BAD_CREDENTIAL_CODES = frozenset(
    {
        "AuthFailure",
        "ExpiredToken",
        "ExpiredTokenException",
        "IncompleteSignature",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "RequestExpired",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
    }
)
_PRINCIPAL_ACCOUNT = re.compile(r"arn:aws[\w-]*:(?:iam|sts)::(\d{12}):")
_XML_CODE = re.compile(r"<Code>([^<]*)</Code>")
_XML_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")
_ON_RESOURCE = re.compile(r"on resource: (arn:\S+?)(?=[\s;)]|$)")


# botocore logs every raw response body at DEBUG ("Response body: ..."), which for
# GetParameter/GetSecretValue is the key itself. Anyone running with debug logging would write
# it to the journal, so while a key is fetched those records are dropped at the source logger
# (a filter there stops propagation to every handler, whoever configured them).
_fetching_key: ContextVar[bool] = ContextVar("wgvsock_aws_fetching_key", default=False)


class _NoSecretBodies(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (_fetching_key.get() and str(record.msg).startswith("Response"))


logging.getLogger("botocore.parsers").addFilter(_NoSecretBodies())


@contextmanager
def _secret_fetch() -> Iterator[None]:
    token = _fetching_key.set(True)
    try:
        yield
    finally:
        _fetching_key.reset(token)


class AWSError(Exception):
    """An AWS call failed in a way the user has to fix; the message says how."""

    def __init__(self, message: str) -> None:
        # The message quotes what the service (or a proxy in front of it) said: escaped and
        # cut short here, once, after the raw text was matched for codes and ARNs. An endpoint
        # it names (botocore's words, the environment's value) loses its user name and
        # password first: https://user:pass@host/ is a valid AWS_ENDPOINT_URL.
        super().__init__(prose(without_userinfo(message), 2000))


class CloudWatchError(AWSError):
    """PutMetricData failed. ``kind`` groups failures a sender reports once each: denied,
    throttled, credentials, unreachable, other."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class ImdsUnavailable(AWSError):
    """No instance metadata service answered: this is not an EC2 instance (or IMDS is off)."""


@dataclass(frozen=True)
class Check:
    """One line of `doctor`'s table. ``ok`` is None when the check does not apply here."""

    name: str
    ok: bool | None
    detail: str

    def __post_init__(self) -> None:
        # Some details quote botocore's words directly, which name the endpoint URL whole.
        object.__setattr__(self, "detail", without_userinfo(self.detail))


@dataclass(frozen=True)
class InstanceIdentity:
    """The fields of the instance identity document that wgvsock uses, plus the whole document."""

    instance_id: str
    region: str
    instance_type: str
    account_id: str
    availability_zone: str
    document: dict[str, Any] = field(repr=False, compare=False)


# ---------------------------------------------------------------------------------------------
# Key specs and loading


def is_aws_key_spec(spec: str) -> bool:
    """True when a profile's ``private_key`` names an AWS store rather than a file path."""
    return spec.startswith(("ssm:", "secretsmanager:"))


def parse_key_spec(spec: str) -> tuple[KeySource, str]:
    """Split ``ssm:NAME`` / ``secretsmanager:NAME`` into (source, name)."""
    source, sep, name = spec.partition(":")
    if not sep or source not in ("ssm", "secretsmanager"):
        raise AWSError(f"key spec {spec!r} must be ssm:NAME or secretsmanager:NAME")
    if not name:
        raise AWSError(f"key spec {spec!r} has an empty name")
    return source, name  # type: ignore[return-value]


def load_private_key(spec: str, *, session: boto3.Session | None = None) -> bytes:
    """Fetch a WireGuard private key (base64 text) from SSM Parameter Store or Secrets Manager.

    ``ssm:NAME`` reads a SecureString with decryption. ``secretsmanager:NAME`` reads the
    SecretString, which is either the base64 key itself or a JSON object whose ``private_key``
    member is. NAME may be a plain name or a full ARN (whose region then wins). Returns the 32
    raw key bytes.
    """
    source, name = parse_key_spec(spec)
    session = session or boto3.Session()
    region = _region_from_arn(name) or session.region_name
    where = f"{source}:{name}"
    with _secret_fetch():
        if source == "ssm":
            text = _fetch_ssm(session, region, name, where)
        else:
            text = _fetch_secret(session, region, name, where)
    try:
        key = key_from_base64(text)
    except KeyFormatError as exc:
        # `from None`: the decode error's context would otherwise carry nothing secret today, but
        # a future change there must not be able to leak the value through a traceback.
        raise AWSError(
            f"{where}: value is not a WireGuard private key ({exc}); store the output of "
            f"`wg genkey` (base64 of 32 bytes)"
        ) from None
    log.info("loaded WireGuard private key from %s", where)
    return key


def _fetch_ssm(session: boto3.Session, region: str | None, name: str, where: str) -> str:
    client = _client(session, "ssm", region, where)
    try:
        resp = client.get_parameter(Name=name, WithDecryption=True)
    except ClientError as exc:
        code = _code(exc)
        if code in ("ParameterNotFound", "ParameterVersionNotFound"):
            raise AWSError(
                f"{where}: SSM parameter {name!r} not found in region {_region_of(client)}"
            ) from exc
        if code in _DENIED_CODES:
            msg = _message(exc)
            if _is_kms_denial(msg):
                raise AWSError(
                    f"{where}: access denied decrypting the SecureString: the caller needs "
                    f"kms:Decrypt on {_kms_resource(msg)} (and the key policy must allow it). "
                    f"AWS said: {msg}"
                ) from exc
            arn = _ssm_parameter_arn(name, _region_of(client), msg)
            raise AWSError(
                f"{where}: access denied: the caller needs ssm:GetParameter on {arn}. "
                f"AWS said: {msg}"
            ) from exc
        if code.startswith("KMS") or code == "InvalidKeyId":
            raise AWSError(
                f"{where}: SSM could not decrypt the SecureString with its KMS key ({code}): "
                f"{_message(exc)}"
            ) from exc
        raise _generic_client_error(exc, where) from exc
    except BotoCoreError as exc:
        raise _botocore_error(exc, where, "ssm") from exc
    param = resp["Parameter"]
    ptype = param.get("Type")
    if ptype == "StringList":
        raise AWSError(f"{where}: parameter is a StringList; store the key as a SecureString")
    if ptype != "SecureString":
        # Accepted because the key still works, but anyone allowed ssm:GetParameter can read a
        # plain String without any KMS permission, so say so loudly.
        log.warning(
            "%s: parameter type is %s, not SecureString: the key is stored unencrypted",
            where,
            prose(ptype, 40),
        )
    value = param.get("Value")
    if not isinstance(value, str):
        raise AWSError(f"{where}: parameter has no value")
    return value


def _fetch_secret(session: boto3.Session, region: str | None, name: str, where: str) -> str:
    client = _client(session, "secretsmanager", region, where)
    try:
        resp = client.get_secret_value(SecretId=name)
    except ClientError as exc:
        code = _code(exc)
        msg = _message(exc)
        if code == "ResourceNotFoundException":
            raise AWSError(
                f"{where}: secret {name!r} not found in region {_region_of(client)}"
            ) from exc
        if code == "DecryptionFailure" or (code in _DENIED_CODES and _is_kms_denial(msg)):
            raise AWSError(
                f"{where}: access denied decrypting the secret: the caller needs kms:Decrypt on "
                f"{_kms_resource(msg)} (and the key policy must allow it). AWS said: {msg}"
            ) from exc
        if code in _DENIED_CODES:
            arn = _secret_arn(name, _region_of(client), msg)
            raise AWSError(
                f"{where}: access denied: the caller needs secretsmanager:GetSecretValue on "
                f"{arn}. AWS said: {msg}"
            ) from exc
        if code == "InvalidRequestException" and "deletion" in msg:
            raise AWSError(f"{where}: secret is scheduled for deletion: {msg}") from exc
        raise _generic_client_error(exc, where) from exc
    except BotoCoreError as exc:
        raise _botocore_error(exc, where, "secretsmanager") from exc
    text = resp.get("SecretString")
    if not isinstance(text, str):
        raise AWSError(
            f"{where}: secret has no SecretString (binary secrets are not supported); store the "
            f'base64 key, or JSON {{"private_key": "..."}}, as the secret string'
        )
    if text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError:
            # No `from exc`: JSONDecodeError keeps the whole document in its .doc attribute.
            raise AWSError(
                f"{where}: secret string starts with '{{' but is not valid JSON"
            ) from None
        key_text = doc.get("private_key") if isinstance(doc, dict) else None
        if not isinstance(key_text, str):
            raise AWSError(
                f'{where}: secret is a JSON object without a string member "private_key"'
            )
        return key_text
    return text


# ---------------------------------------------------------------------------------------------
# Error mapping shared by all calls


def _client(session: boto3.Session, service: str, region: str | None, where: str) -> Any:
    try:
        return session.client(service, region_name=region, config=_CLIENT_CONFIG)
    except NoRegionError:
        raise AWSError(
            f"{where}: no AWS region configured; set AWS_REGION (or AWS_DEFAULT_REGION), a "
            f"profile region, or use the full ARN as the name"
        ) from None
    except InvalidRegionError as exc:  # a ValueError too: before the endpoints' branch
        raise AWSError(f"{where}: {prose(str(exc), 200)}; set AWS_REGION (or "
                       "AWS_DEFAULT_REGION, or the profile's region) to a region's name, "
                       "such as us-east-1") from None
    except (InvalidIMDSEndpointError, InvalidEndpointConfigurationError,
            EndpointResolutionError, ValueError) as exc:
        # Endpoints botocore refuses while making the client (urllib's ValueError for
        # "http://[::1"): the environment's, as a rule.
        names = (IMDS_ENDPOINT_ENV, "AWS_ENDPOINT_URL",
                 f"AWS_ENDPOINT_URL_{service.upper().replace('-', '_')}")
        given = [f"{n}={os.environ[n]!r}" for n in names if os.environ.get(n)]
        fix = (f"check {' and '.join(given)}: each must be an http:// or https:// URL"
               if given else "check the endpoint settings of the AWS configuration")
        raise AWSError(f"{where}: cannot set up the {service} client: "
                       f"{_said(exc, 300)}; {fix}") from None
    except BotoCoreError as exc:  # credentials, as a rule: making the client resolves them
        raise _botocore_error(exc, where, service) from None


def _error_fields(exc: ClientError) -> tuple[str, str]:
    err = exc.response.get("Error", {})
    code = str(err.get("Code", ""))
    msg = str(err.get("Message", ""))
    # A JSON-protocol client (SSM, Secrets Manager) that gets an XML ErrorResponse - as some
    # proxies and emulators (moto's IAM enforcement among them) send for a denial - is left
    # with the HTTP status as Code and the raw XML as Message. Recover the real pair so that a
    # denial is still reported as one.
    if code.isdigit() and msg.lstrip().startswith("<"):
        xml_code = _XML_CODE.search(msg)
        xml_msg = _XML_MESSAGE.search(msg)
        if xml_code:
            code = html.unescape(xml_code.group(1))
            msg = html.unescape(xml_msg.group(1)) if xml_msg else ""
    return code, msg or str(exc)


def _code(exc: ClientError) -> str:
    return _error_fields(exc)[0]


def _message(exc: ClientError) -> str:
    return _error_fields(exc)[1]


def _region_of(client: Any) -> str:
    return str(client.meta.region_name)


def _region_from_arn(name: str) -> str | None:
    if name.startswith("arn:"):
        parts = name.split(":")
        if len(parts) > 3 and parts[3]:
            return parts[3]
    return None


def _partition(region: str) -> str:
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def _account_from(msg: str) -> str:
    # Denials name the caller's ARN, which carries the account: the best guess we have for the
    # resource's account without another (possibly also denied) API call.
    m = _PRINCIPAL_ACCOUNT.search(msg)
    return m.group(1) if m else "ACCOUNT_ID"


def _ssm_parameter_arn(name: str, region: str, msg: str) -> str:
    if name.startswith("arn:"):
        return name
    found = _ON_RESOURCE.search(msg)
    if found and ":ssm:" in found.group(1):
        return found.group(1)
    # Parameter ARNs drop the leading slash of hierarchical names; a version/label suffix
    # (NAME:3) is not part of the resource.
    bare = name.split(":", 1)[0].lstrip("/")
    return f"arn:{_partition(region)}:ssm:{region}:{_account_from(msg)}:parameter/{bare}"


def _secret_arn(name: str, region: str, msg: str) -> str:
    if name.startswith("arn:"):
        return name
    found = _ON_RESOURCE.search(msg)
    if found and ":secretsmanager:" in found.group(1):
        return found.group(1)
    # Secret ARNs end in "-" plus six random characters; "-??????" is the pattern AWS's IAM
    # guidance uses to match exactly that secret and not others sharing the prefix.
    return (
        f"arn:{_partition(region)}:secretsmanager:{region}:{_account_from(msg)}:"
        f"secret:{name}-??????"
    )


def _is_kms_denial(msg: str) -> bool:
    return "kms:" in msg or "KMS" in msg


def _kms_resource(msg: str) -> str:
    found = _ON_RESOURCE.search(msg)
    if found and ":kms:" in found.group(1):
        return found.group(1)
    return "the KMS key that encrypts it"


def _generic_client_error(exc: ClientError, where: str) -> AWSError:
    code = _code(exc)
    if code in _BAD_CREDENTIAL_CODES:
        return AWSError(
            f"{where}: AWS rejected the credentials ({code}): check the access key, session "
            f"token and clock. AWS said: {_message(exc)}"
        )
    if code in ("ThrottlingException", "Throttling", "RequestLimitExceeded"):
        return AWSError(f"{where}: throttled by AWS ({code}); try again later")
    return AWSError(f"{where}: AWS error {code}: {_message(exc)}")


def _botocore_error(exc: BotoCoreError, where: str, service: str) -> AWSError:
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return AWSError(
            f"{where}: no AWS credentials found: attach an IAM instance profile (role) to this "
            f"instance, or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        )
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError):
        url = getattr(exc, "kwargs", {}).get("endpoint_url")
        target = f"the {service} endpoint {url}" if url else f"the {service} endpoint"
        return AWSError(
            f"{where}: cannot reach {target}: check the network, the security group, a VPC "
            f"endpoint for {service}, or AWS_ENDPOINT_URL"
        )
    if isinstance(exc, NoRegionError):
        return AWSError(f"{where}: no AWS region configured; set AWS_REGION")
    if isinstance(exc, ParamValidationError):
        return AWSError(f"{where}: invalid request: {exc}")
    return AWSError(f"{where}: {_said(exc)}")


def _said(exc: BaseException, limit: int = 2000) -> str:
    """EXC as "Type: message" for an AWSError, whatever its str() does (safetext.error: an
    exception of a type not foreseen here may raise there, and the report must still be
    made), an endpoint URL's user name and password cut out before the message is cut."""
    return error(exc, limit, clean=without_userinfo)


# ---------------------------------------------------------------------------------------------
# IMDSv2


class Imds:
    """Minimal IMDSv2 client: a session token, then token-authenticated GETs.

    IMDSv1 is never used: instances launched with ``HttpTokens=required`` (the secure, and now
    the default, setting) refuse it.
    """

    def __init__(
        self, endpoint: str | None = None, timeout: float = 1.0, token_ttl: int = 300
    ) -> None:
        self.endpoint = endpoint or os.environ.get(IMDS_ENDPOINT_ENV) or DEFAULT_IMDS_ENDPOINT
        self.endpoint = self.endpoint.rstrip("/")
        self.timeout = timeout
        self.token_ttl = token_ttl
        self._token: str | None = None
        # No ProxyHandler entries: IMDS is link-local, and an HTTP(S)_PROXY from the environment
        # would both break it and send the token request somewhere else.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _unavailable(self, reason: object) -> ImdsUnavailable:
        return ImdsUnavailable(
            f"not on EC2 (no instance metadata service at {self.endpoint}: {reason}); inside a "
            f"container on EC2, the instance's IMDSv2 hop limit may be too low"
        )

    def _check_endpoint(self) -> None:
        """Refuses an endpoint urllib would not send an HTTP request to: it raised ValueError
        for some ("notaurl", "http://[::1") and read a local file for file://."""
        try:
            url = urllib.parse.urlsplit(self.endpoint)
            ok = url.scheme in ("http", "https") and bool(url.hostname)
            url.port  # noqa: B018 - raises ValueError for a port out of range
        except ValueError:
            ok = False
        if ok and "@" in url.netloc:
            # IMDS takes no password, and urllib took "user:pw@host" for a host name to look
            # up. Shown without it (AWSError).
            raise AWSError(f"{IMDS_ENDPOINT_ENV}={prose(self.endpoint, 200)!r} holds a user "
                           "name or password (before the @), which the instance metadata "
                           f"service takes none of: write it like {DEFAULT_IMDS_ENDPOINT}, or "
                           "unset it")
        if not ok:
            raise AWSError(f"{IMDS_ENDPOINT_ENV}={prose(self.endpoint, 200)!r} is not an http:// "
                           f"or https:// URL: write it like {DEFAULT_IMDS_ENDPOINT} (EC2's own "
                           "metadata service), or unset it")

    def _request(self, req: urllib.request.Request) -> str:
        # Something answered, but not as IMDS does: a proxy or another service at the address.
        odd = (f"instance metadata service at {self.endpoint} answered {req.get_method()} "
               f"{req.selector} with")
        fix = (f"check that {self.endpoint} is EC2's instance metadata service "
               f"({IMDS_ENDPOINT_ENV}, when set, names it)")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                body = resp.read(MAX_IMDS_BODY + 1)
        except urllib.error.HTTPError as exc:
            raise exc from None
        except urllib.error.URLError as exc:
            raise self._unavailable(exc.reason) from None
        except (TimeoutError, ConnectionError) as exc:
            raise self._unavailable(exc) from None
        except http.client.HTTPException as exc:
            raise AWSError(f"{odd} something that is not HTTP ({_said(exc)}); "
                           f"{fix}") from None
        if len(body) > MAX_IMDS_BODY:
            raise AWSError(f"{odd} more than {MAX_IMDS_BODY} bytes; {fix}")
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AWSError(f"{odd} a body that is not UTF-8 (byte {exc.start}); {fix}") from None

    def token(self) -> str:
        """Get (and cache) a session token."""
        if self._token is None:
            self._check_endpoint()  # before Request(), which raises ValueError for some
            req = urllib.request.Request(  # noqa: S310 - endpoint is http(s) by configuration
                self.endpoint + TOKEN_PATH,
                data=b"",
                method="PUT",
                headers={TOKEN_TTL_HEADER: str(self.token_ttl)},
            )
            try:
                self._token = self._request(req).strip()
            except urllib.error.HTTPError as exc:
                if exc.code == 403:
                    raise AWSError(
                        f"instance metadata service at {self.endpoint} refused a token (403): "
                        f"IMDS is disabled on this instance; enable it with `aws ec2 "
                        f"modify-instance-metadata-options --http-endpoint enabled`"
                    ) from None
                raise AWSError(
                    f"instance metadata service at {self.endpoint} answered {exc.code} to the "
                    f"IMDSv2 token request"
                ) from None
        return self._token

    def get(self, path: str) -> str:
        """GET a metadata path (e.g. ``/latest/meta-data/instance-id``) with the session token."""
        for attempt in (1, 2):
            req = urllib.request.Request(  # noqa: S310 - endpoint is http(s) by configuration
                self.endpoint + path, headers={TOKEN_HEADER: self.token()}
            )
            try:
                return self._request(req)
            except urllib.error.HTTPError as exc:
                if exc.code == 401 and attempt == 1:
                    # Token expired between calls: fetch a new one once.
                    self._token = None
                    continue
                if exc.code == 404:
                    raise AWSError(f"instance metadata path {path} not found") from None
                raise AWSError(
                    f"instance metadata service answered {exc.code} for {path}"
                ) from None
        raise AWSError(f"instance metadata service refused the token for {path}")

    def identity(self) -> InstanceIdentity:
        """Read and parse the instance identity document."""
        text = self.get(IDENTITY_PATH)
        try:
            doc = json.loads(text)
        except ValueError:
            raise AWSError("instance identity document is not valid JSON") from None
        try:
            return InstanceIdentity(
                instance_id=str(doc["instanceId"]),
                region=str(doc["region"]),
                instance_type=str(doc.get("instanceType", "")),
                account_id=str(doc.get("accountId", "")),
                availability_zone=str(doc.get("availabilityZone", "")),
                document=doc,
            )
        except (KeyError, TypeError):
            raise AWSError("instance identity document lacks instanceId or region") from None


# ---------------------------------------------------------------------------------------------
# Doctor checks


def _denied_detail(exc: ClientError, permission: str, resource: str = "*") -> str:
    return f"access denied: the caller needs {permission} on {resource}. AWS said: {_message(exc)}"


def check_enclave_support(
    instance_id: str, region: str, *, session: boto3.Session | None = None
) -> Check:
    """Is Nitro Enclaves support enabled on this instance (``EnclaveOptions.Enabled``)?"""
    name = "Enclave support"
    session = session or boto3.Session()
    try:
        client = _client(session, "ec2", region, "ec2")
        resp = client.describe_instances(InstanceIds=[instance_id])
    except AWSError as exc:
        return Check(name, False, str(exc))
    except ClientError as exc:
        if _code(exc) in _DENIED_CODES:
            return Check(name, False, _denied_detail(exc, "ec2:DescribeInstances"))
        if _code(exc).startswith("InvalidInstanceID"):
            return Check(name, False, f"instance {instance_id} not found in {region}")
        return Check(name, False, str(_generic_client_error(exc, "ec2")))
    except BotoCoreError as exc:
        return Check(name, False, str(_botocore_error(exc, "ec2", "ec2")))
    instances = [i for r in resp.get("Reservations", []) for i in r.get("Instances", [])]
    if not instances:
        return Check(name, False, f"instance {instance_id} not found in {region}")
    options = instances[0].get("EnclaveOptions")
    if not isinstance(options, dict) or "Enabled" not in options:
        return Check(name, None, f"EC2 did not report EnclaveOptions for {instance_id}")
    if options["Enabled"]:
        return Check(name, True, f"enabled on {instance_id}")
    # It cannot be switched on for a running (or stopped) instance: there is no
    # modify-instance-attribute for it. Only a launch can set it.
    return Check(
        name,
        False,
        f"not enabled on {instance_id}: enclave support is chosen at launch and cannot be "
        f"changed later; launch a new instance with `aws ec2 run-instances ... "
        f"--enclave-options Enabled=true` (or EnclaveOptions in the launch template)",
    )


def check_instance_type(
    instance_type: str, region: str, *, session: boto3.Session | None = None
) -> Check:
    """Does the instance type support Nitro Enclaves (``NitroEnclavesSupport``)?"""
    name = "Instance type"
    if not instance_type:
        return Check(name, None, "instance type unknown")
    session = session or boto3.Session()
    try:
        client = _client(session, "ec2", region, "ec2")
        resp = client.describe_instance_types(InstanceTypes=[instance_type])
    except AWSError as exc:
        return Check(name, None, f"{instance_type}: could not check ({exc})")
    except ClientError as exc:
        if _code(exc) in _DENIED_CODES:
            # Informational only: enclave support being enabled already proves the type.
            detail = _denied_detail(exc, "ec2:DescribeInstanceTypes")
            return Check(name, None, f"{instance_type}: could not check ({detail})")
        return Check(name, None, f"{instance_type}: could not check ({_code(exc)})")
    except BotoCoreError as exc:
        return Check(name, None, f"{instance_type}: could not check ({_said(exc)})")
    types = resp.get("InstanceTypes", [])
    support = types[0].get("NitroEnclavesSupport") if types else None
    if support == "supported":
        return Check(name, True, f"{instance_type} supports Nitro Enclaves")
    if support == "unsupported":
        return Check(
            name,
            False,
            f"{instance_type} does not support Nitro Enclaves; use a Nitro-based type with at "
            f"least 4 vCPUs (Intel/AMD) or 2 vCPUs (Graviton), e.g. m6i.xlarge or c7g.large",
        )
    return Check(name, None, f"{instance_type}: EC2 did not report NitroEnclavesSupport")


def check_credentials(region: str, *, session: boto3.Session | None = None) -> Check:
    """Are AWS credentials available and accepted (``sts:GetCallerIdentity``)?"""
    name = "AWS credentials"
    session = session or boto3.Session()
    try:
        client = _client(session, "sts", region, "sts")
        resp = client.get_caller_identity()
    except AWSError as exc:  # the client could not be made: the environment's endpoint
        return Check(name, False, str(exc))
    except ClientError as exc:
        return Check(name, False, str(_generic_client_error(exc, "sts")))
    except BotoCoreError as exc:
        return Check(name, False, str(_botocore_error(exc, "sts", "sts")))
    return Check(name, True, str(resp.get("Arn", "")))


# ---------------------------------------------------------------------------------------------
# CloudWatch

_THROTTLED_CODES = frozenset({"Throttling", "ThrottlingException", "RequestLimitExceeded"})


def cloudwatch_client(session: boto3.Session, region: str | None) -> Any:
    return _client(session, "cloudwatch", region, "CloudWatch")


def put_metric_data(client: Any, namespace: str, data: list[dict[str, Any]]) -> None:
    """One PutMetricData call; every failure becomes a CloudWatchError that says what to do."""
    where = f"CloudWatch namespace {namespace!r}"
    try:
        client.put_metric_data(Namespace=namespace, MetricData=data)
    except ClientError as exc:
        code = _code(exc)
        if code in _DENIED_CODES:
            raise CloudWatchError(
                "denied",
                f"{where}: access denied: the caller needs cloudwatch:PutMetricData (on *, "
                f"optionally limited with the cloudwatch:namespace condition key); add it to "
                f"the instance role. AWS said: {_message(exc)}",
            ) from exc
        if code in _THROTTLED_CODES:
            raise CloudWatchError(
                "throttled",
                f"{where}: throttled by CloudWatch ({code}) after retries; data points of "
                f"this interval are dropped: raise parent.metrics.cloudwatch.interval or the "
                f"account's PutMetricData quota",
            ) from exc
        err = _generic_client_error(exc, where)
        kind = "credentials" if code in _BAD_CREDENTIAL_CODES else "other"
        raise CloudWatchError(kind, str(err)) from exc
    except BotoCoreError as exc:
        err = _botocore_error(exc, where, "monitoring")
        kind = "other"
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            kind = "credentials"
        elif isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError):
            kind = "unreachable"
        raise CloudWatchError(kind, str(err)) from exc


def check_put_metric_data(
    namespace: str, dimensions: list[dict[str, str]], region: str,
    *, session: boto3.Session | None = None,
) -> Check:
    """May this caller send metrics (``cloudwatch:PutMetricData``)? PutMetricData has no dry
    run, so this sends one data point: ``wgvsock_doctor_check`` = 1 with the profile's
    dimensions (one metric, billed for the hour it is written)."""
    name = "CloudWatch"
    session = session or boto3.Session()
    datum = {"MetricName": "wgvsock_doctor_check", "Value": 1.0, "Unit": "Count",
             "Dimensions": dimensions}
    try:
        put_metric_data(cloudwatch_client(session, region), namespace, [datum])
    except CloudWatchError as exc:
        return Check(name, False, str(exc))
    except AWSError as exc:
        return Check(name, False, str(exc))
    return Check(name, True, f"cloudwatch:PutMetricData allowed in namespace {namespace!r}")


def doctor_checks(
    imds: Imds | None = None,
    session: boto3.Session | None = None,
    *,
    cloudwatch: tuple[str, str] | None = None,
) -> list[Check]:
    """The AWS half of `parent doctor`. Off EC2 it is a single not-applicable line.
    ``cloudwatch`` is (namespace, profile name) when the profile sends metrics there."""
    imds = imds or Imds()
    try:
        ident = imds.identity()
    except ImdsUnavailable as exc:
        return [Check("EC2 instance", None, str(exc))]
    except AWSError as exc:
        return [Check("EC2 instance", False, str(exc))]
    checks = [
        Check(
            "EC2 instance",
            True,
            f"{ident.instance_id} ({ident.instance_type or 'unknown type'}) in {ident.region}",
        )
    ]
    session = session or boto3.Session()
    creds = check_credentials(ident.region, session=session)
    checks.append(creds)
    if creds.ok is False:
        # Every further call would fail the same way; one clear line beats three.
        checks.append(Check("Enclave support", None, "skipped: no usable AWS credentials"))
        return checks
    checks.append(check_enclave_support(ident.instance_id, ident.region, session=session))
    checks.append(check_instance_type(ident.instance_type, ident.region, session=session))
    if cloudwatch is not None:
        namespace, profile = cloudwatch
        dims = [{"Name": "InstanceId", "Value": ident.instance_id},
                {"Name": "Profile", "Value": profile}]
        checks.append(check_put_metric_data(namespace, dims, ident.region, session=session))
    return checks
