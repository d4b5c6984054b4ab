# Sourced by .ci/run and tests/fuzz/run.sh: `make_venv DIR` makes a Python virtual environment at
# DIR unless it exists. Python tools go there, never into the system Python, which Debian marks
# externally managed; a Debian Python without the venv module gets python3-venv first.
make_venv() {
    local dir="$1"
    [ -x "$dir/bin/python" ] && return 0
    if ! python3 -m venv "$dir" 2>/dev/null; then
        rm -rf "$dir"
        command -v apt-get >/dev/null || { echo "python3 -m venv failed and there is no apt-get" >&2; return 1; }
        echo "installing python3-venv" >&2
        apt-get install -y -q --no-install-recommends python3-venv </dev/null >/dev/null 2>&1 ||
            { apt-get update -q </dev/null >/dev/null 2>&1 &&
              apt-get install -y -q --no-install-recommends python3-venv </dev/null >/dev/null; }
        python3 -m venv "$dir"
    fi
}
