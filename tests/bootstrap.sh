# Sourced by tests/run and the demo: install the system packages and the venv.
# Idempotent and quiet when everything is there already.

NIXFARM_APT_PACKAGES=(
  nix-bin openssh-server openssh-client iproute2 util-linux procps psmisc
  python3 python3-venv python3-dev gcc pkg-config
  libsystemd-dev libgirepository1.0-dev libcairo2-dev   # systemd-python, PyGObject (pydbus)
  debootstrap                                           # the systemd host tests
)

# promtool (the Prometheus exposition checker) from Debian's prometheus package,
# unpacked rather than installed: installing it would start a Prometheus server.
NIXFARM_PROMTOOL_DIR=/var/cache/nixfarm-test/promtool

nixfarm_promtool() {
  [ -x "$NIXFARM_PROMTOOL_DIR/usr/bin/promtool" ] && return 0
  local tmp
  tmp=$(mktemp -d)
  if ! (cd "$tmp" && { apt-get download -qq prometheus 2>/dev/null ||
    { apt-get update -qq && apt-get download -qq prometheus; }; }) >/dev/null; then
    rm -rf "$tmp"
    echo "nixfarm: could not download Debian's prometheus package (for promtool)" >&2
    exit 1
  fi
  mkdir -p "$NIXFARM_PROMTOOL_DIR.new"
  dpkg-deb -x "$tmp"/prometheus_*.deb "$NIXFARM_PROMTOOL_DIR.new"
  rm -rf "$tmp" "$NIXFARM_PROMTOOL_DIR"
  mv "$NIXFARM_PROMTOOL_DIR.new" "$NIXFARM_PROMTOOL_DIR"
}

nixfarm_bootstrap() {
  if [ "$(id -u)" != 0 ]; then
    echo "nixfarm tests: run as root (they create network namespaces, mounts and users)" >&2
    exit 2
  fi
  local missing=()
  for p in "${NIXFARM_APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "nixfarm: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # Debian's python, not one under /root: the builder user must be able to run the gateway.
  if [ ! -x .venv/bin/python ] || [ "$(readlink -f .venv/bin/python)" != "$(readlink -f /usr/bin/python3)" ]; then
    rm -rf .venv
    /usr/bin/python3 -m venv .venv
  fi
  local stamp=.venv/.nixfarm-installed
  if [ ! -f "$stamp" ] || [ agent/pyproject.toml -nt "$stamp" ]; then
    echo "nixfarm: installing the Python environment in .venv" >&2
    if ! { .venv/bin/pip install -q --disable-pip-version-check --upgrade pip &&
           .venv/bin/pip install -q --disable-pip-version-check -e 'agent[systemd,test,lint]'; } >.venv/pip.log 2>&1; then
      cat .venv/pip.log >&2
      echo "nixfarm: pip install failed (log above)" >&2
      exit 1
    fi
    touch "$stamp"
  fi
}
