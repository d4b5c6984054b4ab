# shellcheck shell=bash
# Sourced by .ci/deploy-checks and tests/browser/run.sh. `unpack_prometheus DIR` unpacks Debian's
# prometheus package into DIR/root (prometheus, promtool, the classic web UI) unless it is there:
# installing the package would start a Prometheus daemon. `prometheus_ui_packages DIR` installs the
# libjs-* and font packages the unpacked UI's static/ links point into, when missing (they are only
# files), and links /usr/share/javascript and /usr/share/fonts-glyphicons into DIR/root, where
# those relative links land.
unpack_prometheus() {
    local dir="$1"
    [ -x "$dir/root/usr/bin/prometheus" ] && [ -x "$dir/root/usr/bin/promtool" ] && return 0
    mkdir -p "$dir/debs"
    (cd "$dir/debs" && { apt-get download prometheus >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null 2>&1 && apt-get download prometheus >/dev/null; }; })
    dpkg-deb -x "$(prometheus_deb "$dir")" "$dir/root"
}

prometheus_deb() {
    printf '%s\n' "$1"/debs/prometheus_*.deb | sort -V | tail -n 1
}

prometheus_ui_packages() {
    local dir="$1" deb missing=() package
    deb="$(prometheus_deb "$dir")"
    # The UI's dependencies, from the package's own Depends: fonts-glyphicons-halflings, libjs-*.
    for package in $(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed -E 's/^ *([^ (]+).*/\1/' |
        grep -E '^(libjs-|fonts-)'); do
        dpkg-query -W -f '${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$package")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        command -v apt-get >/dev/null || { echo "no apt-get to install ${missing[*]}" >&2; return 1; }
        echo "installing ${missing[*]} ..." >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null >/dev/null 2>&1 ||
            { apt-get update -q </dev/null >/dev/null 2>&1 &&
              apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null >/dev/null; }
    fi
    ln -sfn /usr/share/javascript "$dir/root/usr/share/javascript"
    ln -sfn /usr/share/fonts-glyphicons "$dir/root/usr/share/fonts-glyphicons"
    # The package links static/popper.js to libjs-popper.js's top folder, whose popper.min.js is the
    # ES module build: a plain <script> stops at its `export`, and Bootstrap finds no Popper.
    # The browser build (UMD) is in umd/.
    ln -sfn ../../../javascript/popper.js/umd "$dir/root/usr/share/prometheus/web/static/popper.js"
}
