#!/usr/bin/env bash
# The newcomer's first command, checked on a fresh clone: `python3 example_project/run.py` must
# create its virtualenv, install the checkout, migrate, seed and serve the page, with nothing but
# Python 3 and the package index. Only committed files are in a clone, so a file that exists
# only in someone's working tree fails here.
#
# Usage: bash .ci/fresh_clone_check.sh [REPO]    (REPO defaults to this checkout)
# Env:   PYTHON (default python3), FRESH_CLONE_TIMEOUT seconds for the first answer (default 300).
set -euo pipefail
set +m  # no job control: the background server stays a plain child that setsid can promote

repo=${1:-$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)}
python=${PYTHON:-python3}
timeout=${FRESH_CLONE_TIMEOUT:-300}
workdir=$(mktemp -d "${TMPDIR:-/tmp}/fresh-clone-check.XXXXXX")
server_pid=""

cleanup() {
    if [[ -n $server_pid ]]; then
        # run.py becomes runserver, whose autoreloader has a child: stop the process group it leads.
        kill -- "-$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$workdir"
}
trap cleanup EXIT

git clone --quiet --no-hardlinks "$repo" "$workdir/clone"
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "fresh-clone check: $python example_project/run.py --port $port in $workdir/clone"

# setsid gives the server its own process group; `timeout` bounds a run that hangs.
(
    cd "$workdir/clone"
    exec env -u EXAMPLE_BACKEND -u EXAMPLE_DATABASE -u EXAMPLE_STORE -u VIRTUAL_ENV \
        setsid timeout "$((timeout + 60))" "$python" example_project/run.py --port "$port"
) >"$workdir/run.log" 2>&1 &
server_pid=$!

if ! "$python" - "$port" "$timeout" "$server_pid" <<'PY'; then
import os
import sys
import time
import urllib.request

port, timeout, pid = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("run.py exited before serving")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            page = response.read().decode()
    except OSError:
        time.sleep(1)
        continue
    if 'id="login-form"' not in page:
        sys.exit("the page at / answered without the sign-in form")
    print(f"fresh-clone check: / answered {response.status} after run.py set everything up")
    sys.exit(0)
sys.exit(f"no answer on port {port} within {timeout:.0f} s")
PY
    echo "fresh-clone check FAILED; run.py said:" >&2
    tail -n 40 "$workdir/run.log" >&2
    exit 1
fi

# The terminal story must work in the fresh clone too.
(cd "$workdir/clone" && example_project/.venv/bin/python example_project/manage.py demo) \
    >"$workdir/demo.log" 2>&1 || {
    echo "fresh-clone check FAILED: manage.py demo" >&2
    cat "$workdir/demo.log" >&2
    exit 1
}
grep -q "payments stored: 1  (alice was charged once)" "$workdir/demo.log"
echo "fresh-clone check: passed"
