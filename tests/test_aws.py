"""wgvsock.services.aws against moto in server mode (a real HTTP endpoint on 127.0.0.1) and a
local IMDSv2.

Nothing here may reach a real AWS endpoint or the real metadata service: the module fixture
clears every AWS_* variable and proxy setting, sets dummy credentials, points AWS_ENDPOINT_URL
at moto and AWS_EC2_METADATA_SERVICE_ENDPOINT at a closed loopback port, and sets
AWS_EC2_METADATA_DISABLED=true so botocore never probes IMDS for credentials or a region.

What moto 5 offers, and where the tests fill in:
* IAM enforcement works in server mode: POST /moto-api/reset-auth with "0" makes moto check
  every request against the caller's IAM policies. It answers SSM and Secrets Manager denials
  with an XML body (real AWS sends JSON), which wgvsock.services.aws normalises; the
  denied-permission tests below go through that real path.
* moto's SSM never involves KMS, so the kms:Decrypt denial is built with botocore's Stubber from
  the error shape AWS documents (AccessDeniedException naming kms:Decrypt).
* moto's IMDS answers /latest/api/token (to any method, without checking the TTL header) and
  /latest/meta-data/*, but not /latest/dynamic/instance-identity/document, so a strict IMDSv2
  stand-in lives here.
* moto accepts EnclaveOptions in run_instances but neither stores nor returns it; the tests set
  the attribute on moto's in-process instance model so describe_instances serialises it.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import secrets
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
import moto.server as moto_server  # the test extra's moto[server]: a missing one must fail
import pytest
from botocore.exceptions import BotoCoreError
from botocore.stub import Stubber

from tests.unsayable import Unsayable
from wgvsock.core.crypto import generate_private_key, key_to_base64
from wgvsock.services import aws

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
PARAM = "/wgvsock/test/parent-key"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Moto:
    url: str
    key: bytes
    # One session for most tests: a fresh boto3.Session re-reads the service models for every
    # client (up to 0.6 s for EC2), which alone would blow the time budget of this file.
    session: boto3.Session
    keys: dict[str, bytes] = field(default_factory=dict)

    def set_auth(self, enforce: bool) -> None:
        # text/plain: with urllib's default form content type, werkzeug would consume the body
        # as form data and moto would see an empty count.
        req = urllib.request.Request(  # noqa: S310 - loopback moto server
            self.url + "/moto-api/reset-auth",
            data=b"0" if enforce else b"inf",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req) as r:
            r.read()


@contextmanager
def running_moto() -> Iterator[Moto]:
    """moto in server mode with the environment described above, its state reset after."""
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("AWS_") or name.lower() in (
                "http_proxy",
                "https_proxy",
                "all_proxy",
                "no_proxy",
            ):
                mp.delenv(name)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        # One attempt: the unreachable-endpoint test would otherwise sit through retry backoff.
        mp.setenv("AWS_MAX_ATTEMPTS", "1")
        # moto loads thousands of AMIs into a new EC2 backend unless told not to (seconds).
        mp.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
        logging.getLogger("werkzeug").setLevel(logging.ERROR)

        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        mp.setenv("AWS_ENDPOINT_URL", url)
        m = Moto(url=url, key=generate_private_key(), session=boto3.Session(region_name=REGION))
        try:
            yield m
        finally:
            m.set_auth(False)
            # The backends live in this process, shared by every server: leave them empty.
            req = urllib.request.Request(url + "/moto-api/reset", data=b"", method="POST")  # noqa: S310
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req) as r:
                r.read()
            server.stop()


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    with running_moto() as m:
        key = m.key
        ssm = m.session.client("ssm")
        ssm.put_parameter(Name=PARAM, Value=key_to_base64(key), Type="SecureString")
        sm = m.session.client("secretsmanager")
        for name in ("wgvsock/plain", "wgvsock/json"):
            m.keys[name] = generate_private_key()
        sm.create_secret(
            Name="wgvsock/plain", SecretString=key_to_base64(m.keys["wgvsock/plain"])
        )
        sm.create_secret(
            Name="wgvsock/json",
            SecretString=json.dumps(
                {"private_key": key_to_base64(m.keys["wgvsock/json"]), "note": "parent"}
            ),
        )
        yield m


@pytest.fixture(scope="module")
def restricted(moto: Moto) -> boto3.Session:
    """A session for an IAM user allowed only ec2:DescribeInstanceTypes."""
    iam = moto.session.client("iam")
    iam.create_user(UserName="wgvsock-restricted")
    iam.put_user_policy(
        UserName="wgvsock-restricted",
        PolicyName="only-instance-types",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Action": ["ec2:DescribeInstanceTypes"], "Resource": "*"}
                ],
            }
        ),
    )
    ak = iam.create_access_key(UserName="wgvsock-restricted")["AccessKey"]
    return boto3.Session(
        aws_access_key_id=ak["AccessKeyId"],
        aws_secret_access_key=ak["SecretAccessKey"],
        region_name=REGION,
    )


@pytest.fixture
def enforce_iam(moto: Moto) -> Iterator[None]:
    moto.set_auth(True)
    try:
        yield
    finally:
        moto.set_auth(False)


def _instance(moto: Moto, instance_type: str, enclave: bool | None) -> str:
    """Run an instance in moto; ``enclave=None`` leaves EnclaveOptions unreported."""
    ec2 = moto.session.client("ec2")
    kwargs: dict[str, Any] = {}
    if enclave is not None:
        kwargs["EnclaveOptions"] = {"Enabled": enclave}
    resp = ec2.run_instances(
        ImageId="ami-12345678", MinCount=1, MaxCount=1, InstanceType=instance_type, **kwargs
    )
    iid = str(resp["Instances"][0]["InstanceId"])
    if enclave is not None:
        shown = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
        if "EnclaveOptions" not in shown:
            # moto ignores EnclaveOptions; the server runs in this process, so set it on the
            # model and let moto's serializer put it into the real describe_instances answer.
            from moto.backends import get_backend

            inst = get_backend("ec2")[ACCOUNT][REGION].get_instance(iid)
            inst.enclave_options = {"Enabled": enclave}
    return iid


# ---------------------------------------------------------------------------------------------
# IMDSv2 stand-in


class FakeImds:
    """IMDSv2 as documented: PUT /latest/api/token with a TTL header 1..21600 returns a token;
    every GET must carry it in X-aws-ec2-metadata-token, otherwise 401."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.tokens: set[str] = set()
        # Headers kept as received (HTTPMessage): lookups are case-insensitive, as in HTTP.
        self.requests: list[tuple[str, str, Message]] = []
        self.refuse_tokens = False
        # When set, sent as the identity document as it is, whatever it is.
        self.identity_body: bytes | None = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: str | bytes = "") -> None:
                data = body.encode() if isinstance(body, str) else body
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                fake.requests.append(("PUT", self.path, self.headers))
                if self.path != aws.TOKEN_PATH:
                    return self._send(404)
                if fake.refuse_tokens:
                    return self._send(403)
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
                if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                    return self._send(400)
                token = secrets.token_urlsafe(24)
                fake.tokens.add(token)
                return self._send(200, token)

            def do_GET(self) -> None:
                fake.requests.append(("GET", self.path, self.headers))
                if self.headers.get("X-aws-ec2-metadata-token") not in fake.tokens:
                    return self._send(401)
                if self.path == aws.IDENTITY_PATH:
                    if fake.identity_body is not None:
                        return self._send(200, fake.identity_body)
                    return self._send(200, json.dumps(fake.document))
                return self._send(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _document(instance_id: str, instance_type: str = "m5.xlarge") -> dict[str, Any]:
    return {
        "accountId": ACCOUNT,
        "architecture": "x86_64",
        "availabilityZone": f"{REGION}a",
        "imageId": "ami-12345678",
        "instanceId": instance_id,
        "instanceType": instance_type,
        "pendingTime": "2026-01-01T00:00:00Z",
        "privateIp": "10.0.0.5",
        "region": REGION,
        "version": "2017-09-30",
    }


@pytest.fixture
def imds() -> Iterator[FakeImds]:
    fake = FakeImds(_document("i-0123456789abcdef0"))
    try:
        yield fake
    finally:
        fake.close()


# ---------------------------------------------------------------------------------------------
# load_private_key


def test_ssm_securestring_default_session(moto: Moto) -> None:
    # No session argument: credentials, region and endpoint all come from the environment.
    assert aws.load_private_key(f"ssm:{PARAM}") == moto.key


def test_ssm_by_arn(moto: Moto) -> None:
    arn = f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter{PARAM}"
    assert aws.load_private_key(f"ssm:{arn}", session=moto.session) == moto.key


def test_secret_plain_and_json(moto: Moto) -> None:
    for name, key in moto.keys.items():
        assert aws.load_private_key(f"secretsmanager:{name}", session=moto.session) == key


def test_ssm_not_found(moto: Moto) -> None:
    with pytest.raises(aws.AWSError, match=r"SSM parameter '/wgvsock/missing' not found"):
        aws.load_private_key("ssm:/wgvsock/missing", session=moto.session)


def test_secret_not_found(moto: Moto) -> None:
    with pytest.raises(aws.AWSError, match=r"secret 'wgvsock/missing' not found in region"):
        aws.load_private_key("secretsmanager:wgvsock/missing", session=moto.session)


@pytest.mark.parametrize("spec", ["ssm", "ssm:", "vault:x", "/etc/key"])
def test_bad_spec(spec: str) -> None:
    with pytest.raises(aws.AWSError, match=r"ssm:NAME or secretsmanager:NAME|empty name"):
        aws.load_private_key(spec)


def test_is_aws_key_spec() -> None:
    assert aws.is_aws_key_spec("ssm:/x") and aws.is_aws_key_spec("secretsmanager:x")
    assert not aws.is_aws_key_spec("/etc/wgvsock/payments.key")


def _assert_secret_absent(err: BaseException, secret: str) -> None:
    """The value must appear neither in the message nor anywhere down the exception chain."""
    seen: BaseException | None = err
    while seen is not None:
        assert secret not in str(seen) and secret not in repr(seen)
        assert secret not in repr(getattr(seen, "args", ()))
        seen = seen.__cause__ or seen.__context__


@pytest.mark.parametrize(
    "value",
    [
        "c2hvcnQtYnV0LXNlY3JldC12YWx1ZQ==",  # valid base64, 24 bytes
        "not base64 at all, but secret: hunter2-hunter2",
        '{"private_key": "c2hvcnQtYnV0LXNlY3JldC12YWx1ZQ=="}',
        '{"privateKey": "c2hvcnQtYnV0LXNlY3JldC12YWx1ZQ=="}',
        '{"private_key": "c2hvcnQtYnV0LXNlY3JldC12YWx1ZQ==", ',  # broken JSON
    ],
)
def test_bad_secret_value_never_echoed(
    moto: Moto, value: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"wgvsock/bad-{secrets.token_hex(4)}"
    moto.session.client("secretsmanager").create_secret(Name=name, SecretString=value)
    caplog.set_level(logging.DEBUG, logger="wgvsock")
    with pytest.raises(aws.AWSError) as info:
        aws.load_private_key(f"secretsmanager:{name}", session=moto.session)
    assert name in str(info.value)
    for secret in ("c2hvcnQtYnV0LXNlY3JldC12YWx1ZQ", "hunter2"):
        _assert_secret_absent(info.value, secret)
        assert secret not in caplog.text


def test_plain_string_parameter_warns_without_key(
    moto: Moto, caplog: pytest.LogCaptureFixture
) -> None:
    key = generate_private_key()
    moto.session.client("ssm").put_parameter(
        Name="/wgvsock/test/plain", Value=key_to_base64(key), Type="String"
    )
    caplog.set_level(logging.DEBUG, logger="wgvsock")
    assert aws.load_private_key("ssm:/wgvsock/test/plain", session=moto.session) == key
    assert "not SecureString" in caplog.text
    assert key_to_base64(key) not in caplog.text


def test_botocore_debug_log_never_has_key(moto: Moto, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # everything, botocore's wire dumps included
    for spec, key in [
        (f"ssm:{PARAM}", moto.key),
        *((f"secretsmanager:{n}", k) for n, k in moto.keys.items()),
    ]:
        assert aws.load_private_key(spec, session=moto.session) == key
        assert key_to_base64(key) not in caplog.text
    # The filter is what kept it out: botocore did log at DEBUG during the calls.
    assert any(r.name.startswith("botocore") for r in caplog.records)
    # ...and it only acts during a key fetch.
    caplog.clear()
    moto.session.client("ssm").get_parameter(Name=PARAM, WithDecryption=True)
    assert key_to_base64(moto.key) in caplog.text


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_debug_logging_keeps_the_session_token_out_of_the_log(
    moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LOG_LEVEL=debug put the root logger at DEBUG, botocore's and urllib3's loggers with it:
    every request the parent signed (a CloudWatch send each interval) wrote the instance
    role's session token (x-amz-security-token in the canonical request and the headers) and
    its access key id to the journal (review finding). Those libraries stay at INFO."""
    from wgvsock.roles import cli

    marker = f"wgvsock-session-token-{secrets.token_hex(8)}"
    monkeypatch.setenv("AWS_SESSION_TOKEN", marker)
    monkeypatch.setenv("LOG_LEVEL", "debug")
    root = logging.getLogger()
    libraries = ("botocore", "boto3", "urllib3", "s3transfer")
    saved = (root.handlers[:], root.level, [logging.getLogger(n).level for n in libraries])
    got = _Records()
    try:
        root.handlers.clear()  # (basicConfig leaves a root that has handlers, as pytest's, alone)
        cli._logging(False)  # as `wgvsock parent up` does
        assert root.level == logging.DEBUG
        root.addHandler(got)
        logging.getLogger("wgvsock.test").debug("our own debug lines still show")
        session = boto3.Session(region_name=REGION)  # reads AWS_SESSION_TOKEN
        client = aws.cloudwatch_client(session, REGION)
        aws.put_metric_data(client, "wgvsock-test", [{"MetricName": "m", "Value": 1.0}])
        assert session.get_credentials().token == marker  # (the request was signed with it)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for name, level in zip(libraries, saved[2], strict=True):
            logging.getLogger(name).setLevel(level)
    text = "\n".join(f"{r.name}: {r.getMessage()}" for r in got.records)
    assert "our own debug lines still show" in text
    assert marker not in text
    assert "Credential=testing/" not in text  # the access key id, in Authorization
    assert not [r for r in got.records
                if r.name.startswith(libraries) and r.levelno < logging.INFO], text


def test_no_credentials(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(aws.AWSError, match="no AWS credentials found"):
        aws.load_private_key(f"ssm:{PARAM}")


def test_no_region(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(aws.AWSError, match="no AWS region configured"):
        aws.load_private_key("secretsmanager:wgvsock/plain")


def test_endpoint_unreachable(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    t0 = time.monotonic()
    with pytest.raises(aws.AWSError, match=r"cannot reach the ssm endpoint") as info:
        aws.load_private_key(f"ssm:{PARAM}")
    assert dead in str(info.value)
    assert time.monotonic() - t0 < 5


# ---------------------------------------------------------------------------------------------
# IAM enforcement in moto: denials name the missing permission


@pytest.mark.usefixtures("enforce_iam")
def test_ssm_denied_names_permission(restricted: boto3.Session) -> None:
    with pytest.raises(aws.AWSError) as info:
        aws.load_private_key(f"ssm:{PARAM}", session=restricted)
    msg = str(info.value)
    assert f"ssm:GetParameter on arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/wgvsock/test/" in msg
    assert "<" not in msg  # moto's XML body was normalised


@pytest.mark.usefixtures("enforce_iam")
def test_secret_denied_names_permission(restricted: boto3.Session) -> None:
    with pytest.raises(aws.AWSError) as info:
        aws.load_private_key("secretsmanager:wgvsock/plain", session=restricted)
    assert (
        f"secretsmanager:GetSecretValue on arn:aws:secretsmanager:{REGION}:{ACCOUNT}:"
        "secret:wgvsock/plain-??????" in str(info.value)
    )


@pytest.mark.usefixtures("enforce_iam")
def test_rejected_credentials(moto: Moto) -> None:
    # Under enforcement the dummy "testing" key belongs to no IAM user.
    with pytest.raises(aws.AWSError, match=r"rejected the credentials \(InvalidClientTokenId\)"):
        aws.load_private_key(f"ssm:{PARAM}", session=moto.session)


@pytest.mark.usefixtures("enforce_iam")
def test_describe_instances_denied(restricted: boto3.Session) -> None:
    check = aws.check_enclave_support("i-0123456789abcdef0", REGION, session=restricted)
    assert check.ok is False
    assert "ec2:DescribeInstances" in check.detail


class _StubSession:
    """Hands out one stubbed client: moto's SSM never calls KMS, so a kms:Decrypt denial can only
    be produced from the error shape AWS documents for it."""

    region_name = REGION

    def __init__(self, client: Any) -> None:
        self._client = client

    def client(self, *args: object, **kwargs: object) -> Any:
        return self._client


def _denied(moto: Moto, service: str, source: str, message: str) -> str:
    """The AWSError text load_private_key(source) gives when `service` answers its call
    with AccessDeniedException and this message."""
    client = moto.session.client(service)
    operation = {"ssm": "get_parameter", "secretsmanager": "get_secret_value"}[service]
    with Stubber(client) as stub:
        stub.add_client_error(operation, service_error_code="AccessDeniedException",
                              service_message=message, http_status_code=400)
        with pytest.raises(aws.AWSError) as info:
            aws.load_private_key(source, session=_StubSession(client))  # type: ignore[arg-type]
    return str(info.value)


def test_kms_decrypt_denied_names_permission(moto: Moto) -> None:
    kms_key = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    text = _denied(moto, "ssm", f"ssm:{PARAM}", (
        f"User: arn:aws:sts::{ACCOUNT}:assumed-role/parent/i-0abc is not authorized to "
        f"perform: kms:Decrypt on resource: {kms_key} because no identity-based policy "
        "allows the kms:Decrypt action (Service: AWSKMS; Status Code: 400; Error Code: "
        "AccessDeniedException)"))
    assert f"kms:Decrypt on {kms_key}" in text
    assert "ssm:GetParameter" not in text


def test_a_long_denial_still_names_the_whole_resource_and_arrives_escaped(moto: Moto) -> None:
    # The raw message is matched for the ARN before the error's text is escaped and cut: a
    # long role or parameter name must not leave the advice with half an ARN, and a line
    # break in what AWS (or a proxy) said must not reach the log as one.
    name = "/org/" + "x" * 400 + "/wg-key"
    arn = f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter{name}"
    text = _denied(moto, "ssm", f"ssm:{name}", (
        f"User: arn:aws:sts::{ACCOUNT}:assumed-role/parent/i-0abc is not authorized to "
        f"perform: ssm:GetParameter on resource: {arn} because no identity-based "
        "policy allows the ssm:GetParameter action\nINFO loaded WireGuard private key"))
    assert f"needs ssm:GetParameter on {arn}. AWS said:" in text
    assert text.isprintable() and "action\\nINFO loaded" in text


def test_secret_kms_denied(moto: Moto) -> None:
    text = _denied(moto, "secretsmanager", "secretsmanager:x", "Access to KMS is not allowed")
    assert "kms:Decrypt on the KMS key that encrypts it" in text


# ---------------------------------------------------------------------------------------------
# IMDSv2


def test_imds_identity(imds: FakeImds) -> None:
    ident = aws.Imds(imds.url).identity()
    assert ident.instance_id == "i-0123456789abcdef0"
    assert (ident.region, ident.instance_type, ident.account_id) == (REGION, "m5.xlarge", ACCOUNT)
    (put, get) = imds.requests
    assert put[:2] == ("PUT", aws.TOKEN_PATH)
    assert get[:2] == ("GET", aws.IDENTITY_PATH)
    assert put[2]["X-aws-ec2-metadata-token-ttl-seconds"] == "300"
    assert get[2]["X-aws-ec2-metadata-token"] in imds.tokens


def test_imds_endpoint_from_env(imds: FakeImds, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url + "/")
    assert aws.Imds().identity().region == REGION


def test_imds_default_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the attribute: no request is made.
    monkeypatch.delenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", raising=False)
    assert aws.Imds().endpoint == "http://169.254.169.254"


def test_imds_refreshes_expired_token(imds: FakeImds) -> None:
    client = aws.Imds(imds.url)
    client.identity()
    imds.tokens.clear()  # every token expires
    assert client.identity().instance_id == "i-0123456789abcdef0"
    assert [r[0] for r in imds.requests] == ["PUT", "GET", "GET", "PUT", "GET"]


def test_imds_disabled(imds: FakeImds) -> None:
    imds.refuse_tokens = True
    with pytest.raises(aws.AWSError, match="IMDS is disabled") as info:
        aws.Imds(imds.url).identity()
    assert not isinstance(info.value, aws.ImdsUnavailable)


def test_imds_connection_refused() -> None:
    with pytest.raises(aws.ImdsUnavailable, match=r"not on EC2 \(no instance metadata service"):
        aws.Imds(f"http://127.0.0.1:{_closed_port()}").identity()


def test_imds_timeout() -> None:
    # A listener that never answers: what a dropped hop-limited PUT looks like from a container.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        # Longer than Imds's 1 s default, which must not be what ends the wait; the bound
        # above it leaves a busy CI's pauses room.
        t0 = time.monotonic()
        with pytest.raises(aws.ImdsUnavailable, match="not on EC2"):
            aws.Imds(f"http://127.0.0.1:{port}", timeout=1.5).identity()
        took = time.monotonic() - t0
        assert 1.5 <= took < 4.5, took


@pytest.mark.parametrize(
    "body, why",
    [
        (b"\xff\xfe{}", "a body that is not UTF-8 (byte 0)"),
        (b"{" + b" " * 64 * 1024 + b"}", "more than 65536 bytes"),
    ],
    ids=["not-utf8", "too-long"],
)
def test_doctor_on_an_imds_answer_it_cannot_read(imds: FakeImds, body: bytes, why: str) -> None:
    imds.identity_body = body
    [check] = aws.doctor_checks(aws.Imds(imds.url))
    assert check.name == "EC2 instance" and check.ok is False
    assert why in check.detail and aws.IDENTITY_PATH in check.detail
    assert f"check that {imds.url} is EC2's instance metadata service" in check.detail


def test_doctor_on_an_endpoint_that_does_not_speak_http() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        [check] = aws.doctor_checks(aws.Imds(f"http://127.0.0.1:{port}"))
        t.join(2)
    assert check.ok is False and "something that is not HTTP (BadStatusLine" in check.detail
    assert aws.TOKEN_PATH in check.detail


# ---------------------------------------------------------------------------------------------
# Enclave support and doctor


def test_enclave_support_enabled_and_disabled(moto: Moto) -> None:
    on = aws.check_enclave_support(_instance(moto, "m5.xlarge", True), REGION, session=moto.session)
    assert on.ok is True
    off = aws.check_enclave_support(
        _instance(moto, "m5.xlarge", False), REGION, session=moto.session
    )
    assert off.ok is False
    assert "--enclave-options Enabled=true" in off.detail
    assert "at launch" in off.detail


def test_enclave_support_unreported_and_missing(moto: Moto) -> None:
    assert (
        aws.check_enclave_support(
            _instance(moto, "m5.xlarge", None), REGION, session=moto.session
        ).ok
        is None
    )
    missing = aws.check_enclave_support("i-0123456789abcdef0", REGION, session=moto.session)
    assert missing.ok is False and "not found" in missing.detail


def test_instance_type(moto: Moto) -> None:
    assert aws.check_instance_type("m5.xlarge", REGION, session=moto.session).ok is True
    t3 = aws.check_instance_type("t3.micro", REGION, session=moto.session)
    assert t3.ok is False and "does not support Nitro Enclaves" in t3.detail


def test_doctor_on_ec2(moto: Moto, imds: FakeImds) -> None:
    imds.document = _document(_instance(moto, "m5.xlarge", True))
    checks = {c.name: c for c in aws.doctor_checks(aws.Imds(imds.url), session=moto.session)}
    assert [c.ok for c in checks.values()] == [True, True, True, True], checks
    assert checks["AWS credentials"].detail.startswith("arn:aws:")


def test_doctor_enclaves_off(moto: Moto, imds: FakeImds) -> None:
    imds.document = _document(_instance(moto, "t3.micro", False), "t3.micro")
    checks = {c.name: c for c in aws.doctor_checks(aws.Imds(imds.url), session=moto.session)}
    assert checks["Enclave support"].ok is False
    assert "--enclave-options Enabled=true" in checks["Enclave support"].detail
    assert checks["Instance type"].ok is False


@pytest.mark.usefixtures("enforce_iam")
def test_doctor_denied(restricted: boto3.Session, imds: FakeImds) -> None:
    checks = {c.name: c for c in aws.doctor_checks(aws.Imds(imds.url), session=restricted)}
    assert checks["EC2 instance"].ok is True
    assert checks["AWS credentials"].ok is True  # sts:GetCallerIdentity needs no permission
    assert checks["Enclave support"].ok is False
    assert "ec2:DescribeInstances" in checks["Enclave support"].detail
    assert checks["Instance type"].ok is True  # the one action the policy allows


def test_doctor_no_credentials(moto: Moto, imds: FakeImds, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    checks = aws.doctor_checks(aws.Imds(imds.url))
    assert [c.ok for c in checks] == [True, False, None]
    assert "no AWS credentials" in checks[1].detail


def test_doctor_off_ec2() -> None:
    checks = aws.doctor_checks(aws.Imds(f"http://127.0.0.1:{_closed_port()}", timeout=0.3))
    assert len(checks) == 1
    assert checks[0].ok is None
    assert "not on EC2 (no instance metadata service" in checks[0].detail


@pytest.mark.parametrize("endpoint", ["notaurl", "http://[::1", "file:///etc",
                                      "ftp://127.0.0.1:1", "169.254.169.254"])
def test_an_endpoint_that_is_no_http_url_is_named_not_a_traceback(
    endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # urllib raised ValueError for the first two (a traceback in `parent doctor`) and read
    # a local file for file://; every one is a mistake in the variable, said as such.
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", endpoint)
    checks = aws.doctor_checks()
    assert [(c.name, c.ok) for c in checks] == [("EC2 instance", False)]
    assert checks[0].detail.startswith(
        f"AWS_EC2_METADATA_SERVICE_ENDPOINT={endpoint!r} is not an http:// or https:// URL")
    with pytest.raises(aws.AWSError, match="is not an http") as info:
        aws.Imds().identity()
    assert not isinstance(info.value, aws.ImdsUnavailable)


@pytest.mark.parametrize("variable", ["AWS_EC2_METADATA_SERVICE_ENDPOINT", "AWS_ENDPOINT_URL"])
@pytest.mark.parametrize("value", ["notaurl", "http://[::1"])
def test_a_client_the_environment_makes_impossible_is_an_aws_error(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # botocore refuses these while making the client (InvalidIMDSEndpointError, ValueError),
    # which escaped as a traceback from `profile pin-parent --key-file ssm:...` and as a
    # logged traceback from `parent up`.
    monkeypatch.setenv(variable, value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    session = boto3.Session(region_name=REGION)
    with pytest.raises(aws.AWSError) as info:
        aws.load_private_key("ssm:/wgvsock/key", session=session)
    assert str(info.value).startswith("ssm:/wgvsock/key: cannot set up the ssm client: ")
    assert variable in str(info.value)


def test_credentials_refused_while_making_a_client_are_named_as_credentials(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # Making a client resolves the credentials too: half of a key pair is not an endpoint
    # problem, and was reported as one ("check the endpoint settings").
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing real, whatever
    session = boto3.Session(region_name=REGION)
    with pytest.raises(aws.AWSError) as info:
        aws.load_private_key("ssm:/wgvsock/key", session=session)
    assert str(info.value).startswith("ssm:/wgvsock/key: no AWS credentials found: ")
    assert "endpoint" not in str(info.value)


def test_a_region_that_is_no_region_name_is_named_as_the_region(monkeypatch) -> None:
    # InvalidRegionError is a ValueError too, and was told to check the endpoint settings.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    session = boto3.Session(region_name="us east 1")
    with pytest.raises(aws.AWSError) as info:
        aws.load_private_key("ssm:/wgvsock/key", session=session)
    assert str(info.value).startswith("ssm:/wgvsock/key: Provided region_name 'us east 1' ")
    assert "set AWS_REGION" in str(info.value) and "endpoint" not in str(info.value)


def test_parent_doctor_command(
    moto: Moto, imds: FakeImds, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`wgvsock parent doctor` end to end: the local checks, the profile against this host,
    and the AWS checks against moto and the IMDSv2 stand-in, as one table."""
    from pathlib import Path

    from wgvsock import cli

    imds.document = _document(_instance(moto, "m5.xlarge", True))
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url)
    monkeypatch.setenv("COLUMNS", "160")
    profile = Path(__file__).parent / "data" / "profile-unix.yaml"
    code = cli.main(["parent", "doctor", "--profile", str(profile)])
    out = capsys.readouterr().out
    for name in ("root", "TUN device", "nftables", "profile", "EC2 instance", "Enclave support",
                 "refusal log"):
        assert name in out, out
    assert "transport is unix" in out
    if os.geteuid() == 0:  # binding a log group needs CAP_NET_ADMIN
        assert "nfnetlink_log available" in out, out
    assert code == (0 if os.geteuid() == 0 else 1), out


def test_parent_doctor_prints_aws_words_as_text_not_markup(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A detail quotes what AWS (or a proxy in front of it) said: rich markup in it must
    neither stop the table ("[/red]" was a MarkupError) nor render, and a line break in it
    must not start a line of its own."""
    from pathlib import Path

    from wgvsock import cli

    said = "AWS said: [/red][link=http://x]boom[/link]\nroot  ready"
    monkeypatch.setattr(aws, "doctor_checks",
                        lambda **_: [aws.Check("EC2 instance", False, said)])
    monkeypatch.setenv("COLUMNS", "200")
    profile = Path(__file__).parent / "data" / "profile-unix.yaml"
    code = cli.main(["parent", "doctor", "--profile", str(profile)])
    out = capsys.readouterr().out
    assert code == 1 and "[/red][link=http://x]boom[/link]\\nroot  ready" in out, out


# ---------------------------------------------------------------------------------------------
# Endpoint URLs with a user name and password in them (https://user:pass@host/)

SECRET = "s3cr3t-pw"  # noqa: S105 - a marker to look for in messages


def _no_userinfo(text: str) -> None:
    assert SECRET not in text and "user:" not in text, text


def test_an_unreachable_endpoint_is_named_without_its_password(
    moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    # botocore takes an endpoint with user info; the message naming the unreachable one
    # printed it whole, password included, to the terminal and the journal.
    port = _closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://user:{SECRET}@127.0.0.1:{port}")
    with pytest.raises(aws.AWSError, match="cannot reach the ssm endpoint") as info:
        aws.load_private_key(f"ssm:{PARAM}")
    _no_userinfo(str(info.value))
    assert f"http://***@127.0.0.1:{port}/" in str(info.value)
    # And the doctor's instance-type line, which quoted botocore's own words unfiltered.
    check = aws.check_instance_type("m5.xlarge", REGION, session=boto3.Session())
    assert check.ok is None and f"127.0.0.1:{port}" in check.detail
    _no_userinfo(check.detail)


def test_an_endpoint_with_user_info_still_works(moto: Moto,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Only messages change: botocore keeps taking such an endpoint.
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.url.replace("://", f"://user:{SECRET}@"))
    assert aws.load_private_key(f"ssm:{PARAM}") == moto.key


@pytest.mark.parametrize("variable", ["AWS_EC2_METADATA_SERVICE_ENDPOINT", "AWS_ENDPOINT_URL"])
def test_a_client_set_up_failure_shows_the_endpoint_without_its_password(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, f"http://user:{SECRET}@[::1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with pytest.raises(aws.AWSError) as info:
        aws.load_private_key("ssm:/wgvsock/key", session=boto3.Session(region_name=REGION))
    assert f"{variable}='http://***@[::1'" in str(info.value)
    _no_userinfo(str(info.value))


@pytest.mark.parametrize("endpoint", ["http://user:{}@127.0.0.1:{}", "ftp://user:{}@x:{}",
                                      "http://user:{}@[::1:{}"])
def test_an_imds_endpoint_with_user_info_is_refused_without_echoing_it(
    endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # IMDS takes no password; urllib took "user:pw@127.0.0.1" for a host name to look up,
    # and every message (doctor's line, the CloudWatch sender's warning) printed it.
    url = endpoint.format(SECRET, _closed_port())
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", url)
    [check] = aws.doctor_checks()
    assert (check.name, check.ok) == ("EC2 instance", False)
    assert check.detail.startswith("AWS_EC2_METADATA_SERVICE_ENDPOINT='")
    _no_userinfo(check.detail)
    if url.startswith("http://") and "[" not in url:
        assert "holds a user name or password" in check.detail


@pytest.mark.parametrize(("text", "shown"), [
    ("at https://user:pw@host:443/x and http://h/", "at https://***@host:443/x and http://h/"),
    ("'http://a:b@c@d/e'", "'http://***@d/e'"),
    ("http://token@h", "http://***@h"),
    ("no url: user@example.com, arn:aws:iam::1:user/x", "no url: user@example.com, "
     "arn:aws:iam::1:user/x"),
    ("https://host/path@v2", "https://host/path@v2"),
])
def test_userinfo_is_cut_from_any_url_in_a_message(text: str, shown: str) -> None:
    assert str(aws.AWSError(text)) == shown
    assert aws.Check("x", None, text).detail == shown


def test_the_doctor_on_an_endpoint_botocore_refuses_says_so(
    imds: FakeImds, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The doctor made its STS and EC2 clients itself, and botocore's ValueError for such an
    # endpoint was a traceback from `parent doctor`.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://user:{SECRET}@[::1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    checks = {c.name: c for c in aws.doctor_checks(aws.Imds(imds.url),
                                                   boto3.Session(region_name=REGION))}
    creds = checks["AWS credentials"]
    assert creds.ok is False and "AWS_ENDPOINT_URL='http://***@[::1'" in creds.detail, creds
    _no_userinfo(creds.detail)
    check = aws.check_enclave_support("i-0123456789abcdef0", REGION,
                                      session=boto3.Session(region_name=REGION))
    assert check.ok is False and "cannot set up the ec2 client" in check.detail, check
    check = aws.check_instance_type("m5.xlarge", REGION, session=boto3.Session(region_name=REGION))
    assert check.ok is None and "cannot set up the ec2 client" in check.detail, check


# ---------------------------------------------------------------------------------------------
# Failures whose message cannot be made


class _UnsayableBotocore(BotoCoreError, Unsayable):
    """A botocore error of a kind not foreseen here, whose str() raises."""


class _UnsayableValue(ValueError, Unsayable):
    """A ValueError botocore could raise while making a client, whose str() raises."""


class _UnsayableHTTP(http.client.HTTPException, Unsayable):
    """What http.client raises for an answer that is not HTTP, whose str() raises."""


class _Raising:
    """A client, session or opener each of whose calls raises EXC."""

    region_name = REGION

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __getattr__(self, name: str) -> Any:
        def call(*args: object, **kwargs: object) -> Any:
            raise self.exc
        return call


def _said_by(path: str) -> str:
    """What the AWS code at PATH reports for a failure whose str() raises."""
    if path == "put_metric_data":
        with pytest.raises(aws.CloudWatchError) as info:
            aws.put_metric_data(_Raising(_UnsayableBotocore()), "wgvsock-t", [])
        assert info.value.kind == "other"
        return str(info.value)
    if path == "load_private_key":
        with pytest.raises(aws.AWSError) as info:
            aws.load_private_key("ssm:/wgvsock/key",  # type: ignore[arg-type]
                                 session=_StubSession(_Raising(_UnsayableBotocore())))
        return str(info.value)
    if path == "check_instance_type":
        check = aws.check_instance_type(  # type: ignore[arg-type]
            "m5.xlarge", REGION, session=_StubSession(_Raising(_UnsayableBotocore())))
        assert check.ok is None
        return check.detail
    if path == "client":
        with pytest.raises(aws.AWSError) as info:
            aws.cloudwatch_client(_Raising(_UnsayableValue()), REGION)  # type: ignore[arg-type]
        return str(info.value)
    assert path == "imds"
    imds = aws.Imds("http://127.0.0.1:9")
    imds._opener = _Raising(_UnsayableHTTP())  # type: ignore[assignment]
    with pytest.raises(aws.AWSError) as info:
        imds.token()
    return str(info.value)


@pytest.mark.parametrize(("path", "said"), [
    ("put_metric_data", "CloudWatch namespace 'wgvsock-t': _UnsayableBotocore (its message "
                        "cannot be shown: ValueError)"),
    ("load_private_key", "ssm:/wgvsock/key: _UnsayableBotocore (its message cannot be shown: "
                         "ValueError)"),
    ("check_instance_type", "m5.xlarge: could not check (_UnsayableBotocore (its message cannot "
                            "be shown: ValueError))"),
    ("client", "CloudWatch: cannot set up the cloudwatch client: _UnsayableValue (its message "
               "cannot be shown: ValueError); check "),
    ("imds", "instance metadata service at http://127.0.0.1:9 answered PUT "
             f"{aws.TOKEN_PATH} with something that is not HTTP (_UnsayableHTTP (its message "
             "cannot be shown: ValueError)); check that "),
], ids=["put_metric_data", "load_private_key", "check_instance_type", "client", "imds"])
def test_a_failure_whose_message_cannot_be_made_is_still_reported(path: str, said: str) -> None:
    """safetext.error names it in the AWSError (or the doctor's line). Before, its str() raised
    again while the message was made: a ValueError escaped in place of the AWSError, a traceback
    from `parent doctor` or `parent up`, and the CloudWatch sender logged 'ValueError: no
    message' for it."""
    assert _said_by(path).startswith(said), _said_by(path)
