"""The enclave image (docker/Dockerfile), built and started the way nitro-cli and Nitro's init do.

No registry is reachable here, so the base is made locally: a debootstrap of Debian bookworm
(minbase + python3) — cached as a tarball under /var/cache/wgvsock-test, made again when missing —
imported into podman. The Dockerfile is built with `podman build --isolation=chroot` from a copy
of the build context and a wheelhouse that docker/build.py fills (the code `make image` runs).

Then the image is started as an enclave starts: its filesystem (`podman image mount`, under a
writable overlay, as the enclave's initramfs is writable) becomes the root of a chroot in a fresh
network namespace that has only `lo`, with /proc, /sys, a minimal /dev (with /dev/net/tun) and
tmpfs /run and /tmp, and the image's CMD (nitro-cli's rule: CMD if set, else ENTRYPOINT) runs
there with exactly the image's environment. The mounts live in a private mount namespace
(`ip netns exec` + `unshare -m`) and vanish with it. The one liberty taken: the profile inside is
replaced by the Unix-socket stand-in's (vsock must never be dialled here), whose socket directory
is bind-mounted in at the same path as on the "parent".

    enclave: chroot into the image, CMD = wgvsock enclave up ... -- wgvsock-app
       │  Unix-socket stand-in for vsock
    parent (wgvsock parent up) ── veth ── internet (HTTP server on 198.51.100.2)

A client in "internet" asks the parent's ingress port; the app inside the enclave fetches a page
from "internet" through the tunnel and the parent's NAT and serves it back: egress and ingress
in one request.

Run these alone with `pytest -m image`. Cold (no cached base) they take about two minutes here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgvsock.services.profile import load_profile

from .netlab import Lab, run, wait_for
from .test_roles import World

pytestmark = [pytest.mark.root, pytest.mark.image]

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("WGVSOCK_TEST_CACHE") or "/var/cache/wgvsock-test")
MIRROR = os.environ.get("WGVSOCK_TEST_DEBIAN_MIRROR") or "http://deb.debian.org/debian"
SUITE = "bookworm"
PACKAGES = "python3"
# Left out of the base to keep it small; nothing in the image needs them.
TRIM = ("var/cache/apt/archives", "var/cache/apt/pkgcache.bin", "var/cache/apt/srcpkgcache.bin",
        "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale",
        "usr/share/info")
# Everything that decides the base's content; a change makes a new cache file.
RECIPE = (f"debootstrap --variant=minbase --include={PACKAGES} {SUITE} "
          f"arch={platform.machine()} trim={','.join(TRIM)} v1")
BUILD_TIMEOUT = 600
APP_PORT = 8080  # World's profile forwards the parent's 8443 to it


def _load_build_module():
    spec = importlib.util.spec_from_file_location("wgvsock_docker_build", ROOT / "docker/build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build_module()


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: `make test` installs them with apt")


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return run("podman", *args, timeout=timeout, check=check)


# -- the base image ---------------------------------------------------------------------------


def base_tarball() -> Path:
    """A tarball of Debian bookworm minbase + python3, made once and kept in CACHE."""
    key = hashlib.sha256(RECIPE.encode()).hexdigest()[:16]
    tarball = CACHE / f"base-{key}.tar"
    if tarball.exists() and tarball.stat().st_size > 0:
        return tarball
    need("debootstrap")
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="base-", dir=CACHE))
    try:
        rootfs = work / "root"
        res = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(rootfs),
             MIRROR], capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)
        if res.returncode != 0:
            pytest.fail(f"debootstrap of {SUITE} from {MIRROR} failed:\n{res.stdout[-3000:]}"
                        f"\n{res.stderr[-2000:]}")
        for rel in TRIM:
            path = rootfs / rel
            if path.is_dir():
                shutil.rmtree(path)
                path.mkdir()
            elif path.exists():
                path.unlink()
        # debootstrap copies the host's resolver and name; an image carries neither.
        (rootfs / "etc/resolv.conf").write_text("")
        (rootfs / "etc/hostname").write_text("localhost\n")
        partial = work / "base.tar"
        run("tar", "--numeric-owner", "--sort=name", "-C", str(rootfs), "-cf", str(partial),
            ".", timeout=BUILD_TIMEOUT)
        os.replace(partial, tarball)  # atomic: a half-written tarball is never used
    finally:
        # A failed debootstrap may leave /proc or /sys mounted in the target: never recurse
        # into those.
        for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
            target = line.split()[4]
            if target.startswith(f"{work}/"):
                run("umount", "-l", target, check=False)
        shutil.rmtree(work, ignore_errors=True)
    return tarball


# -- the image --------------------------------------------------------------------------------


class Image:
    """What the module's tests share: the built image, its config and a few facts."""

    def __init__(self, workdir: Path, tag: str) -> None:
        self.workdir = workdir
        self.tag = tag
        self.base = f"localhost/wgvsock-test-base:{tag}"
        self.ref = build.image_ref("podman", f"wgvsock-test-enclave:{tag}")
        self.refs = [self.ref]
        self.context = workdir / "context"
        self.timings: dict[str, float] = {}
        self.mountpoint: Path | None = None
        self.inspect: dict = {}

    def stage_context(self) -> None:
        """The files the Dockerfile copies, laid out as in the repository, plus a wheelhouse."""
        ctx = self.context
        (ctx / "docker").mkdir(parents=True)
        shutil.copy2(ROOT / "docker/Dockerfile", ctx / "docker/Dockerfile")
        shutil.copytree(ROOT / "docker/app", ctx / "docker/app",
                        ignore=shutil.ignore_patterns("__pycache__"))
        (ctx / "enclave").mkdir()
        shutil.copy2(ROOT / "enclave/profile.example.yaml", ctx / "enclave/profile.example.yaml")
        shutil.copy2(ROOT / ".dockerignore", ctx / ".dockerignore")
        build.wheelhouse(ctx / "docker/wheels", python=sys.executable)

    def build(self, ref_tag: str) -> dict:
        cmd = build.build_command("podman", ref_tag, base=self.base, context=self.context,
                                  isolation="chroot")
        res = run(*cmd, "--pull=never", timeout=BUILD_TIMEOUT, check=False)
        assert res.returncode == 0, f"podman build failed:\n{res.stdout[-4000:]}\n{res.stderr}"
        ref = build.image_ref("podman", ref_tag)
        if ref not in self.refs:
            self.refs.append(ref)
        return json.loads(podman("image", "inspect", ref).stdout)[0]

    def close(self) -> None:
        if self.mountpoint is not None:
            podman("image", "unmount", self.ref, check=False)
        # Plain rmi: a name shared with another image ID (a concurrent run's reproducible
        # build) is only untagged. Our images first, then the base they were built on.
        for ref in [*self.refs, self.base]:
            podman("rmi", ref, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


def sweep_stale_images() -> None:
    """Removes images an earlier run left behind when it was killed (tags carry the pid of the
    run that made them; a live pid's images, e.g. a concurrent run's, are left alone)."""
    out = podman("images", "--format", "{{.Repository}}:{{.Tag}}", check=False).stdout
    # Enclave images before the bases they were built on.
    for ref in sorted(out.split(), key=lambda r: "test-base" in r):
        repo, _, tag = ref.rpartition(":")
        if not repo.startswith(("localhost/wgvsock-test-enclave", "localhost/wgvsock-test-base")):
            continue
        pid = tag.removeprefix("t").split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            podman("image", "unmount", ref, check=False)
            podman("rmi", ref, check=False)


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    need("podman", "debootstrap", "tar")
    sweep_stale_images()
    img = Image(Path(tempfile.mkdtemp(prefix="wgvsock-image-")), f"t{os.getpid()}")
    try:
        t = time.monotonic()
        tarball = base_tarball()
        img.timings["base"] = time.monotonic() - t
        t = time.monotonic()
        podman("import", str(tarball), img.base, timeout=BUILD_TIMEOUT)
        img.timings["import"] = time.monotonic() - t
        t = time.monotonic()
        img.stage_context()
        img.timings["wheelhouse"] = time.monotonic() - t
        t = time.monotonic()
        img.inspect = img.build(f"wgvsock-test-enclave:{img.tag}")
        img.timings["build"] = time.monotonic() - t
        img.mountpoint = Path(podman("image", "mount", img.ref).stdout.strip())
        yield img
    finally:
        img.close()


def nitro_command(config: dict) -> list[str]:
    """What nitro-cli puts in the EIF as the enclave's command: CMD if set, else ENTRYPOINT."""
    return list(config.get("Cmd") or config.get("Entrypoint") or [])


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_image_builds_small_and_reproducibly(image: Image) -> None:
    config = image.inspect["Config"]
    cmd = nitro_command(config)
    assert cmd[:5] == ["/usr/local/bin/wgvsock", "enclave", "up", "--profile",
                       "/etc/wgvsock/profile.yaml"]
    assert cmd[5:] == ["--", "/usr/local/bin/wgvsock-app"]
    # nitro-cli never joins ENTRYPOINT and CMD, and ignores WORKDIR: neither may matter.
    assert not config.get("Entrypoint")
    assert all(a.startswith("/") for a in (cmd[0], cmd[4], cmd[6]))

    mnt = image.mountpoint
    assert mnt is not None
    for path in (cmd[0], cmd[-1]):
        assert os.access(mnt / path.lstrip("/"), os.X_OK), path
    # The profile baked in is the example one, and it is valid.
    baked = load_profile(mnt / "etc/wgvsock/profile.yaml")
    assert baked.transport.kind == "vsock"
    site = mnt / "usr/local/lib/python3.11/dist-packages"
    installed = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert {"wgvsock", "cryptography", "pyroute2", "pyyaml", "cbor2"} <= installed
    # Parent-only dependencies, build tools and the wheelhouse stay out of the image.
    assert not installed & {"boto3", "botocore", "rich", "pip", "setuptools"}, installed
    assert not (mnt / "wheels").exists() and not (mnt / "staging").exists()
    # Byte code is compiled at build time, for the paths the enclave sees, and the per-packet
    # modules to C (mypyc), as on the parent: both ends of the tunnel run the same code.
    assert list((site / "wgvsock/__pycache__").glob("cli.cpython-311.pyc"))
    assert list(site.glob("wgvsock_native__mypyc.cpython-311-*.so"))
    assert list((site / "wgvsock/core").glob("engine.cpython-311-*.so"))

    base_size = json.loads(podman("image", "inspect", image.base).stdout)[0]["Size"]
    size = image.inspect["Size"]
    added = size - base_size
    print(f"image {image.ref}: {size / 1e6:.1f} MB, of which {added / 1e6:.1f} MB over the "
          f"{base_size / 1e6:.1f} MB base; timings {image.timings}")
    assert added < 60e6, f"wgvsock and its dependencies add {added / 1e6:.1f} MB"

    # The same inputs give the same image: config, layers and digest, with the wheelhouse
    # filled afresh as `make image` does on every run. wgvsock's own wheel is compiled anew
    # there, in another temporary directory: before, its two C extensions carried that
    # directory's name in their debug information, so every `make image` had a new PCR0.
    wheels = image.context / "docker/wheels"

    def own_wheel() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in wheels.glob("wgvsock-*.whl")}

    first = own_wheel()
    build.wheelhouse(wheels, python=sys.executable)
    assert own_wheel() == first, "wgvsock's wheel differs from one wheelhouse to the next"
    again = image.build(f"wgvsock-test-enclave:{image.tag}-again")
    assert again["Id"] == image.inspect["Id"]
    assert again["RootFS"]["Layers"] == image.inspect["RootFS"]["Layers"]
    assert again["Digest"] == image.inspect["Digest"]


@pytest.mark.timeout(900)
def test_staged_files_carry_the_epoch_whatever_the_engine_clamps(image: Image) -> None:
    """docker (the default engine where it runs) clamps no file times, unlike podman's
    --timestamp: before, the staged files kept the build's clock time, which linuxkit writes
    into the EIF, so PCR0 changed on every build (review finding). Built here with podman as
    docker is asked: the epoch as a build argument, no --timestamp."""
    ref_tag = f"wgvsock-test-enclave:{image.tag}-unclamped"
    cmd = build.build_command("docker", ref_tag, base=image.base, context=image.context)
    assert "--timestamp" not in cmd and "SOURCE_DATE_EPOCH=0" in cmd
    res = run("podman", *cmd[1:], "--isolation=chroot", "--layers=false", "--pull=never",
              timeout=BUILD_TIMEOUT, check=False)
    assert res.returncode == 0, f"podman build failed:\n{res.stdout[-4000:]}\n{res.stderr}"
    ref = build.image_ref("podman", ref_tag)
    image.refs.append(ref)
    mnt = Path(podman("image", "mount", ref).stdout.strip())
    try:
        site = mnt / "usr/local/lib/python3.11/dist-packages"
        staged = [site / "wgvsock", mnt / "usr/local/bin/wgvsock", mnt / "etc/wgvsock"]
        times = {p.lstat().st_mtime for top in staged
                 for p in [top, *(top.rglob("*") if top.is_dir() else [])]}
        assert times == {0}, f"file times {sorted(times)[:5]}"
    finally:
        podman("image", "unmount", ref, check=False)


@pytest.mark.timeout(900)
def test_byte_code_follows_a_replaced_source(image: Image, tmp_path: Path) -> None:
    """An app image `FROM wgvsock-enclave` that replaces an installed module's source (a
    patched file; an upgrade, with pip --no-compile or PYTHONDONTWRITEBYTECODE, of a package
    the image shares with wgvsock, such as idna or pyyaml) runs the new source. Before, the
    image's pyc files were unchecked-hash ones, which Python uses without looking at the
    source: the old code ran on, silently (review finding)."""
    assert image.mountpoint is not None
    site = image.mountpoint / "usr/local/lib/python3.11/dist-packages"
    copy = tmp_path / "site"
    shutil.copytree(site / "idna", copy / "idna")  # with the image's __pycache__
    (copy / "idna/package_data.py").write_text('__version__ = "replaced"\n')
    code = f"import sys; sys.path.insert(0, {str(copy)!r}); import idna; print(idna.__version__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False)
    assert sys.version_info[:2] == (3, 11)  # the image's byte code is for its 3.11
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "replaced"


def _enclave_script() -> str:
    """Runs in the enclave's network namespace and a private mount namespace: builds the root
    as Nitro's init finds it, then execs the command in a chroot with only the given env."""
    return r"""
set -eu
lower=$1 upper=$2 work=$3 root=$4 sockdir=$5
shift 5
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$root"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount -t tmpfs -o mode=0755,size=1m dev "$root/dev"
mknod -m 0666 "$root/dev/null" c 1 3
mknod -m 0666 "$root/dev/zero" c 1 5
mknod -m 0666 "$root/dev/full" c 1 7
mknod -m 0666 "$root/dev/random" c 1 8
mknod -m 0666 "$root/dev/urandom" c 1 9
mknod -m 0666 "$root/dev/tty" c 5 0
mkdir "$root/dev/net" && mknod -m 0666 "$root/dev/net/tun" c 10 200
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
mount -t tmpfs -o mode=0755 run "$root/run"
mount -t tmpfs -o mode=1777 tmp "$root/tmp"
mkdir -p "$root$sockdir"
mount --bind "$sockdir" "$root$sockdir"
exec "$@"
"""


def start_enclave(world: World, image: Image, log: Path) -> subprocess.Popen:
    assert image.mountpoint is not None
    tmp = world.lab.tmp
    upper, work, rootfs = tmp / "upper", tmp / "work", tmp / "rootfs"
    for d in (upper, work, rootfs):
        d.mkdir()
    # The profile of this test (Unix-socket transport) in place of the image's vsock example:
    # it is the same file the parent reads, sockets at the same path on both sides.
    (upper / "etc/wgvsock").mkdir(parents=True)
    shutil.copy2(world.profile, upper / "etc/wgvsock/profile.yaml")
    config = image.inspect["Config"]
    env = dict(e.split("=", 1) for e in config.get("Env") or [])
    env.update(FETCH_URL="http://198.51.100.2/", APP_PORT=str(APP_PORT), LOG_LEVEL="verbose")
    sockdir = str(tmp / "sock")
    with open(log, "ab") as out:
        return world.enclave.popen(
            "unshare", "-m", "--propagation", "private", "--",
            "sh", "-c", _enclave_script(), "enclave-init",
            str(image.mountpoint), str(upper), str(work), str(rootfs), sockdir,
            "env", "-i", *(f"{k}={v}" for k, v in env.items()),
            "chroot", str(rootfs), *nitro_command(config),
            stdout=out, stderr=out,
        )


@pytest.mark.timeout(900)
def test_image_runs_as_an_enclave(image: Image, lab: Lab) -> None:
    host_resolv = Path("/etc/resolv.conf").read_bytes()
    world = World(lab)
    log = lab.tmp / "enclave-image.log"
    try:
        assert world.parent_cmd("up").returncode == 0
        world.enclave_proc = proc = start_enclave(world, image, log)

        def through_the_enclave() -> str | None:
            if proc.poll() is not None:
                raise AssertionError(f"the enclave exited with {proc.returncode}:\n"
                                     f"{log.read_text(errors='replace')}")
            return world.curl(world.internet, "http://198.51.100.1:8443/", timeout=5)

        try:
            page = wait_for(through_the_enclave, 90, "the app in the image, through ingress",
                            max_delay=1.0)
        except TimeoutError as e:
            raise AssertionError(f"{e}\nenclave log:\n{log.read_text(errors='replace')}") from e
        # ingress reached the app; the app's fetch went out through the tunnel and the NAT
        assert "GET http://198.51.100.2/ -> 200 OK" in page, page
        assert page.endswith("hello from the internet\n"), page

        # Like a real enclave: only lo and the tunnel.
        links = world.enclave.ip("-o", "link", "show").stdout
        assert sorted(line.split(":")[1].strip() for line in links.splitlines()) == ["lo", "wg0"]
        # wgvsock wrote the enclave's resolv.conf inside the image's root, not the host's.
        assert "nameserver 198.51.100.53" in (lab.tmp / "upper/etc/resolv.conf").read_text()
        assert Path("/etc/resolv.conf").read_bytes() == host_resolv
        # The enclave's mounts stayed in its own mount namespace.
        assert str(lab.tmp) not in Path("/proc/self/mountinfo").read_text()

        # SIGTERM (what stopping an enclave's init does to its command) reaches the app, and
        # `enclave up` exits with the app's status.
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
        assert code in (0, 128 + signal.SIGTERM, -signal.SIGTERM), log.read_text()
        assert "wgvsock-app: stopping" in log.read_text()
    finally:
        world.close()


# -- the files around the image ---------------------------------------------------------------


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` on the template (it checks instance `i`). It insists that the
    ExecStart binary exists; where /usr/local/bin/wgvsock is not installed, a stub stands in
    for it inside a private mount namespace, so the host is left as it was."""
    need("systemd-analyze", "unshare")
    unit = ROOT / "parent" / "wgvsock-parent@.service"
    verify = ["systemd-analyze", "verify", "--man=no", str(unit)]
    if os.access("/usr/local/bin/wgvsock", os.X_OK):
        res = run(*verify, check=False, timeout=60)
    else:
        script = ("mount -t tmpfs tmpfs /usr/local/bin && printf '#!/bin/sh\\n' > "
                  "/usr/local/bin/wgvsock && chmod 755 /usr/local/bin/wgvsock && exec \"$@\"")
        res = run("unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
                  *verify, check=False, timeout=60)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    assert not os.path.exists("/usr/local/bin/wgvsock") or os.access(
        "/usr/local/bin/wgvsock", os.X_OK)
    text = unit.read_text()
    for needle in ("/etc/wgvsock/%i.yaml", "Restart=on-failure", "network-online.target",
                   "nitro-enclaves-allocator.service", " -f"):
        assert needle in text, needle


def test_eif_without_nitro_cli_says_what_is_missing(tmp_path: Path) -> None:
    if shutil.which("nitro-cli"):
        pytest.skip("nitro-cli is installed here")
    res = subprocess.run([sys.executable, str(ROOT / "docker/build.py"), "eif"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode != 0
    assert "nitro-cli is not installed" in res.stderr and "aws-nitro-enclaves-cli" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_lock_pins_the_enclave_dependencies() -> None:
    """docker/requirements.lock pins every run-time dependency but the parent-only ones, with
    hashes, and no more than the enclave needs."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in deps}
    lock = (ROOT / "docker/requirements.lock").read_text()
    pinned = {line.split("==")[0] for line in lock.splitlines() if "==" in line}
    # prometheus_client: the parent's metrics; dnspython: its DNS forwarder (egress by name).
    assert {n.replace("_", "-") for n in names} - {
        "boto3", "rich", "prometheus-client", "dnspython"} <= pinned
    assert not pinned & {"boto3", "botocore", "rich", "s3transfer", "prometheus-client",
                         "dnspython", "pip", "setuptools"}
    entries = lock.split("==")[1:]
    assert all("--hash=sha256:" in e for e in entries)
    build_lock = (ROOT / "docker/build.lock").read_text()
    assert {"pip", "setuptools", "mypy"} <= {ln.split("==")[0] for ln in build_lock.splitlines()
                                     if "==" in ln}



def _bogus_setuptools(links: Path) -> None:
    """A setuptools wheel newer than the locked one, with nothing in it."""
    import zipfile

    links.mkdir()
    info = "setuptools-999.0.dist-info"
    with zipfile.ZipFile(links / "setuptools-999.0-py3-none-any.whl", "w") as z:
        z.writestr("setuptools/__init__.py", "")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: setuptools\nVersion: 999.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


def test_wheelhouse_builds_with_the_locked_tools_only(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's pip settings (PIP_* variables, pip.conf) do not reach the build of
    wgvsock's wheel. Before, pip's --isolated held for the outer pip only: the pip that
    installs the build's own tools read PIP_FIND_LINKS and pip.conf, took from there any
    setuptools or mypy newer than the locked ones, and so built another wheel (another image,
    another PCR0) or none (review finding)."""
    links = tmp_path / "links"
    _bogus_setuptools(links)
    config = tmp_path / "pip.conf"
    config.write_text(f"[global]\nfind-links = {links}\n")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    monkeypatch.setenv("WGVSOCK_PURE", "1")  # the tools are the point, not the compiling
    out = build.wheelhouse(tmp_path / "wheels", python=sys.executable)
    [wheel] = out.glob("wgvsock-*.whl")
    locked = next(ln.split("==")[1].split()[0] for ln in build.LOCKS[1].read_text().splitlines()
                  if ln.startswith("setuptools=="))
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        generator = z.read("wgvsock-0.1.0.dist-info/WHEEL").decode()
    assert f"Generator: setuptools ({locked})" in generator, generator


def _other_python() -> str | None:
    """A CPython other than the image's 3.11 on this machine, if there is one."""
    found = [shutil.which(f"python3.{minor}") for minor in range(12, 16)]
    found += [str(p) for p in sorted(Path("/root/.pyenv/versions").glob("3.1[2-9]*/bin/python3"))]
    for python in filter(None, found):
        res = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2] != (3, 11))"],
                             capture_output=True, text=True, timeout=30, check=False)
        if res.returncode == 0 and res.stdout.strip() == "True":
            return python
    return None


def test_wheelhouse_from_another_python_says_which_to_use(tmp_path: Path) -> None:
    """`make image` from a venv of another Python (Ubuntu 24.04's python3 is 3.12) compiles
    wgvsock for that Python, which the image's 3.11 cannot install. Before, pip's own error
    from deep inside the wheel build (no mypy for it in the wheelhouse) was all it said."""
    python = _other_python()
    if python is None:
        pytest.skip("no CPython other than 3.11 here")
    env = {k: v for k, v in os.environ.items() if k != "WGVSOCK_PURE"}
    res = subprocess.run([python, str(ROOT / "docker/build.py"), "wheelhouse",
                          "--out", str(tmp_path / "wheels")],
                         capture_output=True, text=True, timeout=120, env=env, check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    last = res.stderr.strip().splitlines()[-1]
    assert "the image's is 3.11" in last and "PYTHON=" in last and "WGVSOCK_PURE=1" in last, last
    assert not (tmp_path / "wheels").exists()  # said before anything was downloaded
