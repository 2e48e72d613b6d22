"""The enclave image pipeline behind `make wheelhouse`, `make image` and `make eif`.

    python docker/build.py wheelhouse [--out DIR]
    python docker/build.py image [--engine docker|podman] [--tag T] [--base IMAGE]
    python docker/build.py eif [--engine ...] [--tag T] [--base IMAGE] [--output FILE]

wheelhouse  downloads the locked wheels (docker/requirements.lock: the enclave's run-time
            dependencies; docker/build.lock: pip and setuptools) with --require-hashes for the
            image's Python (CPython 3.11, glibc 2.28+, this machine's architecture), and builds
            wgvsock's own wheel from this checkout with the locked setuptools, its per-packet
            modules compiled by the locked mypy (mypyc; needs a C compiler, or WGVSOCK_PURE=1
            for pure Python, which a wheelhouse for another architecture always is). Needs
            PyPI; the image build afterwards fetches nothing but the base image.
image       fills the wheelhouse, then builds docker/Dockerfile with the repository root as
            context, with docker if its daemon answers, else podman, with timestamps pinned to
            SOURCE_DATE_EPOCH (default 0) so that the same inputs give the same image digest.
eif         checks for nitro-cli first (and says what to install when it is missing), does
            what `image` does, runs `nitro-cli build-enclave`, and prints the EIF's path and PCRs.

Standard library only; every failure is one line on stderr and a non-zero exit, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
WHEELHOUSE = ROOT / "docker" / "wheels"
LOCKS = (ROOT / "docker" / "requirements.lock", ROOT / "docker" / "build.lock")
IMAGE_PYTHON = "3.11"
DEFAULT_TAG = "wgvsock-enclave:latest"
DEFAULT_EIF = ROOT / "build" / "wgvsock-enclave.eif"
PODMAN_SOCKET = "/run/podman/podman.sock"
# A fixed wheel timestamp (zip cannot store times before 1980).
WHEEL_EPOCH = "315532800"

WHEEL_README = """\
# wgvsock

WireGuard over vsock for AWS Nitro Enclaves, in Python. This wheel was built for an enclave
image; the documentation is the README of the wgvsock repository.
"""

NITRO_CLI_MISSING = """\
nitro-cli is not installed, so no EIF can be built here.
  It comes with the AWS Nitro Enclaves CLI, on the EC2 instance (or any Linux build machine):
    Amazon Linux 2023:  sudo dnf install -y aws-nitro-enclaves-cli aws-nitro-enclaves-cli-devel
    Amazon Linux 2:     sudo amazon-linux-extras install aws-nitro-enclaves-cli
                        sudo yum install -y aws-nitro-enclaves-cli-devel
    other distributions: build it from github.com/aws/aws-nitro-enclaves-cli
  `make image` builds the enclave image alone, without nitro-cli."""


class BuildError(Exception):
    pass


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+ " + " ".join(cmd), flush=True)
    try:
        return subprocess.run(cmd, check=True, **kw)
    except FileNotFoundError:
        raise BuildError(f"{cmd[0]}: not found") from None
    except subprocess.CalledProcessError as e:
        what = " ".join(cmd[:4])
        raise BuildError(f"{what} ... failed with exit status {e.returncode}") from None


# -- wheelhouse ------------------------------------------------------------------------------


def wheel_platforms(arch: str | None = None) -> list[str]:
    arch = arch or platform.machine()
    return [f"manylinux_2_28_{arch}", f"manylinux2014_{arch}"]


def python_version(python: str) -> str:
    try:
        res = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=60, check=False)
    except OSError as e:
        raise BuildError(f"cannot run {python}: {e.strerror or e}") from None
    if res.returncode != 0:
        raise BuildError(f"{python} does not run: {res.stderr.strip()[-300:]}")
    return res.stdout.strip()


def wheel_build_env(arch: str | None = None) -> dict[str, str]:
    """The environment of wgvsock's wheel build. The pip that installs the build's tools
    (setuptools, mypy) is one that the outer pip starts, and --isolated does not pass on to
    it: without PIP_* and pip.conf it finds the locked tools in the wheelhouse alone, not a
    newer one in the machine's find-links or indexes (another wheel, image and PCR0)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # pip then reads no configuration file at all
    env["SOURCE_DATE_EPOCH"] = WHEEL_EPOCH
    if (arch or platform.machine()) != platform.machine():
        env["WGVSOCK_PURE"] = "1"  # mypyc compiles for this machine only
    return env


def wheelhouse(out: Path, python: str = sys.executable, arch: str | None = None) -> Path:
    """Fills OUT (emptied first) with the locked wheels and wgvsock's own wheel."""
    env = wheel_build_env(arch)
    if env.get("WGVSOCK_PURE", "") in ("", "0") and (
            version := python_version(python)) != IMAGE_PYTHON:
        # mypyc and the C extensions compile for the Python that builds: a wheel the image's
        # Python cannot install, and the locked mypy is not even there for this one.
        raise BuildError(
            f"this Python ({python}) is {version}, the image's is {IMAGE_PYTHON}, and "
            f"wgvsock's compiled modules are built for the Python that builds the wheelhouse: "
            f"run it with Python {IMAGE_PYTHON} (make image PYTHON=python{IMAGE_PYTHON}), or "
            f"set WGVSOCK_PURE=1 for a pure-Python wgvsock (slower: bench/README.md)")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    # --isolated: the machine's pip.conf (extra indexes, find-links) must not change the result.
    pip = [python, "-m", "pip", "--isolated", "--disable-pip-version-check"]
    platforms = [f"--platform={p}" for p in wheel_platforms(arch)]
    run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--require-hashes",
         "--python-version", IMAGE_PYTHON, "--implementation", "cp",
         "--abi", "cp" + IMAGE_PYTHON.replace(".", ""), *platforms,
         "-d", str(out), *(a for lock in LOCKS for a in ("-r", str(lock)))])
    with tempfile.TemporaryDirectory(prefix="wgvsock-wheel-") as tmp:
        # A clean copy: no build/ leftovers or __pycache__ from the working tree can slip in.
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "LICENSE", "setup.py", "build_backend.py"):
            shutil.copy2(ROOT / name, src / name)
        # The README becomes the wheel's long description, which the image carries: a short
        # fixed one keeps documentation edits from changing the image and so its PCRs.
        (src / "README.md").write_text(WHEEL_README)
        shutil.copytree(ROOT / "wgvsock", src / "wgvsock",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # Build isolation gets setuptools and mypy from the wheelhouse only: the locked ones.
        run([*pip, "wheel", "-q", "--no-deps", "--no-index", "--find-links", str(out),
             "-w", str(out), str(src)], env=env)
    shutil.copy2(LOCKS[0], out / "requirements.lock")
    wheels = sorted(p.name for p in out.glob("*.whl"))
    print(f"wheelhouse {out}: {len(wheels)} wheels")
    for name in wheels:
        print(f"  {name}")
    return out


# -- image -----------------------------------------------------------------------------------


def docker_works() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        res = subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def pick_engine(requested: str | None) -> str:
    if requested:
        if shutil.which(requested) is None:
            raise BuildError(f"{requested} is not installed")
        return requested
    if docker_works():
        return "docker"
    if shutil.which("podman"):
        return "podman"
    if shutil.which("docker"):
        raise BuildError("docker is installed but its daemon does not answer (`docker info` "
                         "fails): start it (systemctl start docker) or install podman")
    raise BuildError("neither docker nor podman is installed: install one of them "
                     "(Amazon Linux 2023: sudo dnf install -y docker && "
                     "sudo systemctl enable --now docker)")


def image_ref(engine: str, tag: str) -> str:
    """podman names local images localhost/NAME; docker's API wants the same name back."""
    if engine == "podman" and "/" not in tag.split(":")[0]:
        return f"localhost/{tag}"
    return tag


def build_command(engine: str, tag: str, *, base: str | None = None, context: Path = ROOT,
                  dockerfile: Path | None = None, epoch: str = "0",
                  isolation: str | None = None) -> list[str]:
    dockerfile = dockerfile or context / "docker" / "Dockerfile"
    cmd = [engine, "build", "-f", str(dockerfile), "-t", image_ref(engine, tag)]
    if base:
        cmd += ["--build-arg", f"BASE={base}"]
    # The Dockerfile gives every file it stages this time, whatever the engine.
    cmd += ["--build-arg", f"SOURCE_DATE_EPOCH={epoch}"]
    if engine == "podman":
        # --timestamp pins the created time and every file's time in the layers; --layers=false
        # commits one layer over the base and leaves no intermediate images behind.
        cmd += ["--timestamp", epoch, "--layers=false"]
        if isolation:
            cmd += [f"--isolation={isolation}"]
    return [*cmd, str(context)]


def build_image(engine: str, tag: str, base: str | None, epoch: str) -> str:
    ref = image_ref(engine, tag)
    run(build_command(engine, tag, base=base, epoch=epoch))
    info = subprocess.run([engine, "image", "inspect", ref], capture_output=True, text=True,
                          check=False)
    if info.returncode == 0:
        data = json.loads(info.stdout)[0]
        size = data.get("Size") or data.get("VirtualSize") or 0
        digest = data.get("Digest") or ""
        print(f"image {ref}: id {data.get('Id', '?')[:19]}, {size / 1e6:.0f} MB"
              + (f", digest {digest}" if digest else ""))
    return ref


# -- eif -------------------------------------------------------------------------------------


def nitro_env(engine: str) -> dict[str, str]:
    """nitro-cli reads the image through the Docker API; podman serves it on its socket."""
    env = dict(os.environ)
    if engine == "podman" and "DOCKER_HOST" not in env:
        if not os.path.exists(PODMAN_SOCKET):
            raise BuildError("nitro-cli reads images through the Docker API; with podman, "
                             "start its socket first: sudo systemctl enable --now podman.socket")
        env["DOCKER_HOST"] = f"unix://{PODMAN_SOCKET}"
    return env


def build_eif(engine: str, ref: str, output: Path) -> int:
    output.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["nitro-cli", "build-enclave", "--docker-uri", ref, "--output-file", str(output)]
    print("+ " + " ".join(cmd), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True, env=nitro_env(engine), check=False)
    sys.stderr.write(res.stderr)
    if res.returncode != 0:
        sys.stdout.write(res.stdout)
        raise BuildError(f"nitro-cli build-enclave failed with exit status {res.returncode}")
    measurements_file = output.with_suffix(".json")
    measurements_file.write_text(res.stdout)
    try:
        pcrs = json.loads(res.stdout[res.stdout.index("{"):])["Measurements"]
    except (ValueError, KeyError):
        sys.stdout.write(res.stdout)
        raise BuildError("nitro-cli printed no measurements") from None
    print(f"\nEIF: {output} ({output.stat().st_size / 1e6:.0f} MB; give the enclave at least "
          f"{4 * output.stat().st_size / 2**20:.0f} MiB of memory)")
    for key in sorted(k for k in pcrs if k.startswith("PCR")):
        print(f"{key}: {pcrs[key]}")
    print(f"measurements saved to {measurements_file}; for the profile's attestation block run:\n"
          f"  wgvsock attest pcrs {measurements_file}")
    return 0


# -- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="docker/build.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    wh = sub.add_parser("wheelhouse", help="collect the locked wheels and build wgvsock's")
    wh.add_argument("--out", type=Path, default=WHEELHOUSE)
    wh.add_argument("--arch", default=None, help="x86_64 or aarch64 (default: this machine)")
    for name in ("image", "eif"):
        p = sub.add_parser(name)
        p.add_argument("--engine", choices=("docker", "podman"),
                       default=os.environ.get("ENGINE") or None)
        p.add_argument("--tag", default=DEFAULT_TAG)
        p.add_argument("--base", default=os.environ.get("BASE") or None,
                       help="base image (default: the Dockerfile's python:3.11-slim)")
        p.add_argument("--epoch", default=os.environ.get("SOURCE_DATE_EPOCH") or "0")
        p.add_argument("--no-wheelhouse", action="store_true",
                       help="use docker/wheels as it is instead of filling it again")
        if name == "eif":
            p.add_argument("--output", type=Path, default=DEFAULT_EIF)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "wheelhouse":
            wheelhouse(args.out, arch=args.arch)
            return 0
        if args.cmd == "eif" and shutil.which("nitro-cli") is None:
            print(NITRO_CLI_MISSING, file=sys.stderr)
            return 2
        engine = pick_engine(args.engine)
        if not args.no_wheelhouse:
            wheelhouse(WHEELHOUSE)
        elif not any(WHEELHOUSE.glob("wgvsock-*.whl")):
            raise BuildError(f"no wheelhouse in {WHEELHOUSE}: run `make wheelhouse` first")
        ref = build_image(engine, args.tag, args.base, args.epoch)
        if args.cmd == "eif":
            return build_eif(engine, ref, args.output)
        return 0
    except BuildError as e:
        print(f"docker/build.py {args.cmd}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
