#!/usr/bin/env bash
# aarch64 smoke test under emulation: the agent from this working tree, run on a Debian 12 arm64 root
# through qemu-user-static, against packages built on this (x86) host for raspberry-pi-5.
#
#   1. once, cached: a minimal Debian arm64 root (debootstrap --variant=minbase --foreign, second
#      stage through qemu), python3 + venv, and a venv there with the agent's aarch64 wheels;
#   2. every run: a wheel of the working tree installed into that venv with [agent,litert] (and
#      [openvino] when pyproject.toml has that extra), then scripts/arm64_smoke.py checks
#      `edge-agent doctor --json`, `edgesdk verify`, every variant of the packages against their
#      reference outputs, and one MQTT deployment to an emulated agent answered over /v1/infer.
# It prints a table (check, result, detail) and exits non-zero on any failure. Emulated latencies
# are meaningless (qemu translates every instruction): nothing here reports speed.
#
# Needs root (debootstrap, chroot, mounts) and network access to a Debian mirror and PyPI.
# Environment:
#   EDGESDK_ARM64_ROOT    cache folder of the root (default: ${XDG_CACHE_HOME:-~/.cache}/edgesdk-arm64-root)
#   EDGESDK_ARM64_WORK    scratch folder of a run (default: out/arm64-smoke; emptied each run)
#   EDGESDK_ARM64_MIRROR  Debian mirror (default: the host's first deb.debian.org-style URI)
#   EDGESDK_ARM64_EXTRAS  extras installed on the emulated device (default: agent,litert[,openvino])
#   EDGESDK_ARM64_QEMU_CPU  CPU model qemu emulates (default: cortex-a76, a Raspberry Pi 5's core,
#                         matching the /proc/cpuinfo the root sees; 'max' adds SVE, i8mm, ...)
#   EDGESDK_ARM64_DEPLOY  package deployed over MQTT: mlp (default), orientation or face
#   EDGESDK_ARM64_REBUILD=1  rebuild the cached root from scratch
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EDGESDK_VENV:-$ROOT/.venv}"
CACHE="${EDGESDK_ARM64_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/edgesdk-arm64-root}"
ROOTFS="$CACHE/rootfs"
STAMP="$CACHE/root-ready"
WORK="${EDGESDK_ARM64_WORK:-$ROOT/out/arm64-smoke}"
SUITE=bookworm
DEVICE_VENV=/opt/edgesdk-venv
# qemu-user reads the CPU model from the environment of every arm64 process it starts. Its default,
# 'max', has SVE: there OpenVINO's int8 variant gives wrong outputs (cosine 0.64) where a Cortex-A76
# or Neoverse-N1 model gives right ones, so emulate the CPU the profile targets.
export QEMU_CPU="${EDGESDK_ARM64_QEMU_CPU:-cortex-a76}"
# Written into the stamp: a change here rebuilds the cached root.
RECIPE="debian-$SUITE-arm64-minbase python3-venv ca-certificates; venv $DEVICE_VENV; v1"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}'; }
T0=$(now)

[ "$(id -u)" -eq 0 ] || die "run as root: debootstrap, chroot and the bind mounts need it (sudo $0)"
# Every mount below lives in a private mount namespace that ends with this script: procfs mounts
# of one PID namespace share a superblock, and a bind mount over $ROOTFS/proc/cpuinfo was seen to
# land on the host's own /proc/cpuinfo (every host process then read an aarch64 cpuinfo).
if [ -z "${EDGESDK_ARM64_PRIVATE_NS:-}" ]; then
  export EDGESDK_ARM64_PRIVATE_NS=1
  exec unshare --mount --propagation private bash "$0" "$@"
fi
[ -x "$VENV/bin/edgesdk" ] || die "no host venv at $VENV: run scripts/setup_env.sh first"

# -- host tools --------------------------------------------------------------------------------
if ! command -v debootstrap >/dev/null || [ ! -x /usr/bin/qemu-aarch64-static ] || ! command -v update-binfmts >/dev/null; then
  step "installing qemu-user-static, debootstrap and binfmt-support (Debian packages)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap binfmt-support >/dev/null
fi

# arm64 ELF files run through qemu by the kernel's binfmt_misc. The F flag (qemu-user-static's
# default registration) opens the interpreter once, so it also works inside the chroot without a
# copy of qemu there; we copy it in anyway for kernels that register without F.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
    || die "binfmt_misc is not mounted and cannot be mounted here (a container without CAP_SYS_ADMIN?): \
on the container's host run 'apt-get install qemu-user-static' (or docker run --privileged \
tonistiigi/binfmt --install arm64), then re-run"
fi
if ! grep -qs '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64; then
  update-binfmts --enable qemu-aarch64 2>/dev/null || update-binfmts --import qemu-aarch64 \
    || die "cannot register qemu-aarch64 with binfmt_misc"
fi

# -- the cached root ---------------------------------------------------------------------------
MOUNTS=()
unmount_all() {
  local i
  for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do
    umount "${MOUNTS[$i]}" 2>/dev/null || umount -l "${MOUNTS[$i]}" 2>/dev/null || true
  done
  MOUNTS=()
}
bind() {  # bind SOURCE TARGET [ro]: mount once, remember for unmount_all
  mountpoint -q "$2" && return 0
  mount --bind "$1" "$2"
  [ "${3:-}" = ro ] && mount -o remount,bind,ro "$2"
  MOUNTS+=("$2")
}
mount_root() {
  # What the emulated device sees of the host: its own /proc with an aarch64 /proc/cpuinfo over it
  # (onnxruntime >= 1.28 dies with SIGSEGV at import under qemu when it parses the host's x86 one),
  # /dev, /sys read-only, DNS and the host's CA bundle (for pip), and the work folder at the
  # same absolute path so the paths the host tools write into agent.yaml hold inside too.
  mountpoint -q "$ROOTFS/proc" || { mount -t proc proc "$ROOTFS/proc"; MOUNTS+=("$ROOTFS/proc"); }
  bind "$CACHE/cpuinfo" "$ROOTFS/proc/cpuinfo" ro
  bind /dev "$ROOTFS/dev"
  bind /sys "$ROOTFS/sys" ro
  cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
  [ -f /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/host-ca-bundle.crt"
  if [ -d "$WORK" ]; then mkdir -p "$ROOTFS$WORK"; bind "$WORK" "$ROOTFS$WORK"; fi
}
in_root() {  # run a command inside the root with a clean environment
  chroot "$ROOTFS" /usr/bin/env -i HOME=/root LANG=C.UTF-8 QEMU_CPU="$QEMU_CPU" PATH="$DEVICE_VENV/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    PIP_CERT=/etc/host-ca-bundle.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 "$@"
}
trap unmount_all EXIT

write_cpuinfo() {
  # Four Cortex-A76 cores as a Raspberry Pi 5's kernel lists them.
  local i
  : >"$1"
  for i in 0 1 2 3; do
    cat >>"$1" <<EOF
processor	: $i
BogoMIPS	: 108.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x4
CPU part	: 0xd0b
CPU revision	: 1

EOF
  done
}

debian_mirror() {
  if [ -n "${EDGESDK_ARM64_MIRROR:-}" ]; then echo "$EDGESDK_ARM64_MIRROR"; return; fi
  # The host's own Debian mirror (deb822 or one-line format); the security archive has no base system.
  local uri
  uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2}' | grep -v security | head -1)
  [ -z "$uri" ] && uri=$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
    | awk '{print $2}' | grep -v security | head -1)
  echo "${uri:-http://deb.debian.org/debian}"
}

# A run killed without its EXIT trap leaves mounts inside the root: drop them before anything else
# (and never rm -rf through one).
awk -v r="$ROOTFS/" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l

ROOT_T0=$(now); ROOT_BUILT=0
if [ "${EDGESDK_ARM64_REBUILD:-0}" = 1 ] || [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$RECIPE" ]; then
  MIRROR=$(debian_mirror)
  step "building the arm64 root in $ROOTFS (debootstrap from $MIRROR; ~10 min, once)"
  rm -rf "$ROOTFS" "$STAMP"
  mkdir -p "$CACHE"
  write_cpuinfo "$CACHE/cpuinfo"
  debootstrap --variant=minbase --arch=arm64 --foreign --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; die "debootstrap (first stage) failed: $CACHE/debootstrap.log"; }
  cp /usr/bin/qemu-aarch64-static "$ROOTFS/usr/bin/"
  mount_root
  chroot "$ROOTFS" /debootstrap/debootstrap --second-stage >>"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; die "debootstrap (second stage, emulated) failed: $CACHE/debootstrap.log"; }
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n' >"$ROOTFS/etc/hosts"
  step "creating $DEVICE_VENV in the root"
  in_root python3 -m venv "$DEVICE_VENV"
  in_root pip install -q --upgrade pip
  unmount_all
  echo "$RECIPE" >"$STAMP"
  ROOT_BUILT=1
else
  step "cached arm64 root: $ROOTFS"
fi
ROOT_S=$(since "$ROOT_T0")

# -- the agent from the working tree -----------------------------------------------------------
rm -rf "$WORK"
mkdir -p "$WORK/wheel"
mount_root
EXTRAS="${EDGESDK_ARM64_EXTRAS:-}"
if [ -z "$EXTRAS" ]; then
  EXTRAS=agent,litert
  # Another runtime's device extra, when this tree has one (issue 11: openvino for Pi profiles).
  "$VENV/bin/python" - "$ROOT/pyproject.toml" <<'PY' && EXTRAS="$EXTRAS,openvino"
import sys, tomllib
extras = tomllib.load(open(sys.argv[1], "rb"))["project"].get("optional-dependencies", {})
sys.exit(0 if "openvino" in extras else 1)
PY
fi
INSTALL_T0=$(now)
step "building a wheel of the working tree (on the host) and installing it with [$EXTRAS] on the device"
# A copy without the venv and outputs: the build writes build/ and *.egg-info next to its sources.
mkdir -p "$WORK/tree"
tar -C "$ROOT" --exclude=./.venv --exclude=./out --exclude=./.git --exclude=./build --exclude='*.egg-info' \
  --exclude=__pycache__ -cf - . | tar -C "$WORK/tree" -xf -
"$VENV/bin/python" -m pip wheel -q --no-deps -w "$WORK/wheel" "$WORK/tree" >"$WORK/wheel.log" 2>&1 \
  || { cat "$WORK/wheel.log" >&2; die "building the wheel failed"; }
WHEEL=$(ls "$WORK"/wheel/edgesdk-*.whl)
# The version does not change between runs of the tree: force the package itself, then let pip add
# whatever the extras need that the cached venv lacks.
in_root pip install -q --force-reinstall --no-deps "$WHEEL" >"$WORK/pip.log" 2>&1 \
  && in_root pip install -q "$WHEEL[$EXTRAS]" >>"$WORK/pip.log" 2>&1 \
  || { tail -30 "$WORK/pip.log" >&2; die "pip install on the emulated device failed: $WORK/pip.log"; }
INSTALL_S=$(since "$INSTALL_T0")

# -- the checks --------------------------------------------------------------------------------
cp "$ROOT/scripts/arm64_smoke.py" "$WORK/arm64_smoke.py"
set +e
"$VENV/bin/python" "$WORK/arm64_smoke.py" host --rootfs "$ROOTFS" --device-venv "$DEVICE_VENV" \
  --work "$WORK" --extras "$EXTRAS" --root-built "$ROOT_BUILT" --root-seconds "$ROOT_S" \
  --install-seconds "$INSTALL_S" --started "$T0" --deploy "${EDGESDK_ARM64_DEPLOY:-mlp}"
RC=$?
set -e
exit $RC
