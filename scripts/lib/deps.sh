# Shared by scripts/run and scripts/test: install missing Debian packages.
# Usage: need_pkgs PKG...
need_pkgs() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing Debian packages: ${missing[*]}" >&2
    local SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "need root (or sudo) to install: ${missing[*]}" >&2; return 1; }
        SUDO=sudo
    fi
    export DEBIAN_FRONTEND=noninteractive
    # jackd2 asks whether to enable real-time priority; answer for it
    echo "jackd2 jackd/tweak_rt_limits boolean false" | $SUDO debconf-set-selections 2>/dev/null || true
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The packages the daemon needs to build (cpal's ALSA backend).
BUILD_PKGS=(libasound2-dev pkg-config)
