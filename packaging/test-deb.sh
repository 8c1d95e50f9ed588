#!/bin/bash
# Prove the .deb on a real minimal Debian: debootstrap bookworm (cached), boot it with
# systemd-nspawn, apt install the package, check the service and /health, reload, restart,
# socket activation, apt purge, and check that nothing is left behind.
#
#   packaging/test-deb.sh [DEB] [--cache DIR] [--install-deps] [--keep]
#
# DEB             the package (default: the newest dist/tokenpak_*_all.deb)
# --cache DIR     where the pristine bookworm tree is kept (default /var/cache/tokenpak-test,
#                 or $TOKENPAK_TEST_CACHE); each run boots a throwaway copy of it
# --install-deps  apt-get install debootstrap/systemd-container when missing (also CI=true)
# --keep          keep the container tree and its console log for a post-mortem
#
# Needs root. The container shares the host's network (apt fetches the package's
# dependencies from the mirror in /etc/apt/sources.list*), so 127.0.0.1:8766 must be free.
set -euo pipefail

log() { echo "test-deb: $*"; }
die() { echo "test-deb: FAIL: $*" >&2; exit 1; }
trap 'echo "test-deb: FAIL: line $LINENO: $BASH_COMMAND" >&2' ERR

repo=$(cd "$(dirname "$0")/.." && pwd)
deb=""
cache=${TOKENPAK_TEST_CACHE:-/var/cache/tokenpak-test}
install_deps=0
[ "${CI:-}" = true ] && install_deps=1
keep=0
while [ $# -gt 0 ]; do
    case "$1" in
        --cache) [ $# -ge 2 ] || die "--cache needs a directory"; cache=$2; shift ;;
        --install-deps) install_deps=1 ;;
        --keep) keep=1 ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option: $1 (see --help)" ;;
        *) deb=$1 ;;
    esac
    shift
done

[ "$(id -u)" = 0 ] || die "run as root (debootstrap and systemd-nspawn need it)"
if [ -z "$deb" ]; then
    deb=$(ls -t "$repo"/dist/tokenpak_*_all.deb 2>/dev/null | head -n 1 || true)
fi
[ -n "$deb" ] && [ -f "$deb" ] || die "no .deb (build one with packaging/build-deb.sh)"

# --- tools ---------------------------------------------------------------------------------
missing=""
command -v debootstrap >/dev/null || missing="$missing debootstrap"
command -v systemd-nspawn >/dev/null || missing="$missing systemd-container"
command -v nsenter >/dev/null || missing="$missing util-linux"
if [ -n "$missing" ]; then
    [ $install_deps = 1 ] || die "missing:$missing (apt-get install them, or pass --install-deps)"
    log "installing$missing"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
fi

# --- a pristine bookworm, debootstrapped once from the mirror apt already uses -------------
mirror=${TOKENPAK_TEST_MIRROR:-}
if [ -z "$mirror" ]; then
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
                 /etc/apt/sources.list.d/*.sources 2>/dev/null \
             | grep -oE '(https?|file)://[^ ]*/debian/?( |$)' | grep -v -- '-security' \
             | head -n 1 | tr -d ' ' || true)
    mirror=${mirror:-http://deb.debian.org/debian}
fi
base="$cache/bookworm"
if [ ! -x "$base/usr/lib/systemd/systemd" ]; then
    log "debootstrapping bookworm from $mirror into $base (once)"
    mkdir -p "$cache"
    rm -rf "$base.tmp"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus \
        bookworm "$base.tmp" "$mirror" > "$cache/debootstrap.log" 2>&1 \
        || { tail -n 20 "$cache/debootstrap.log" >&2; die "debootstrap failed"; }
    mv "$base.tmp" "$base"
fi

fake_port=18766  # the fake upstream inside the container
for port in 8766 $fake_port; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "127.0.0.1:$port is in use on this host; the container shares its network"
    fi
done

# --- boot a throwaway copy ------------------------------------------------------------------
work=$(mktemp -d /var/tmp/tokenpak-nspawn.XXXXXX)
machine="tokenpak-test-$$"
nspawn_pid=""
leader=""

in_ct() {  # run a command inside the container, with a clean environment
    nsenter -t "$leader" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive "$@"
}

cleanup() {
    status=$?
    if [ $status != 0 ] && [ -n "$leader" ] && kill -0 "$leader" 2>/dev/null; then
        echo "--- journal of tokenpak.service ---" >&2
        in_ct journalctl -u tokenpak.service --no-pager -n 40 >&2 || true
    fi
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        [ -n "$leader" ] && in_ct systemctl poweroff >/dev/null 2>&1 || true
        for _ in $(seq 60); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$nspawn_pid" 2>/dev/null && kill "$nspawn_pid" 2>/dev/null || true
        wait "$nspawn_pid" 2>/dev/null || true
    fi
    if [ $keep = 1 ]; then
        log "kept $work (console: $work/console.log)"
    else
        rm -rf "$work"
    fi
    exit $status
}
trap cleanup EXIT

cat > "$work/fakeup.py" <<'EOF'
import http.server, json, sys
class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked streams as the providers send

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        if request.get("stream"):
            return self.stream()
        body = json.dumps({"id": "chatcmpl-test", "object": "chat.completion", "model": "gpt-4o",
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": "pong"}}],
                           "usage": {"prompt_tokens": 5, "completion_tokens": 1,
                                     "total_tokens": 6}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def stream(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": "gpt-4o"}
        events = [dict(chunk, choices=[{"index": 0, "delta": {"content": piece},
                                        "finish_reason": None}]) for piece in ("po", "ng")]
        events.append(dict(chunk, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        events.append(dict(chunk, choices=[], usage={"prompt_tokens": 5, "completion_tokens": 2,
                                                     "total_tokens": 7}))
        for data in [json.dumps(e) for e in events] + ["[DONE]"]:
            event = ("data: %s\n\n" % data).encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Upstream).serve_forever()
EOF
cp -a --reflink=auto "$base" "$work/root"
cp "$deb" "$work/root/var/tmp/tokenpak.deb"
systemd-nspawn --boot --register=no --keep-unit -D "$work/root" -M "$machine" \
    > "$work/console.log" 2>&1 < /dev/null &
nspawn_pid=$!
for _ in $(seq 100); do
    # the container's pid 1 is nspawn's child once it runs systemd (before that, the child
    # is nspawn's own intermediate process)
    leader=$( (ps --ppid "$nspawn_pid" -o pid=,comm= 2>/dev/null || true) \
              | awk '$2 == "systemd" {print $1; exit}')
    [ -n "$leader" ] && break
    kill -0 "$nspawn_pid" 2>/dev/null || { cat "$work/console.log" >&2; die "nspawn exited"; }
    sleep 0.2
done
[ -n "$leader" ] || die "the container did not start"
state=""
for _ in $(seq 120); do  # systemctl fails at once until the manager is up: ask again
    state=$(timeout 120 nsenter -t "$leader" -a env -i PATH=/usr/bin:/bin \
                systemctl is-system-running --wait 2>/dev/null || true)
    case "$state" in running|degraded|maintenance|stopping|offline) break ;; esac
    sleep 1
done
case "$state" in
    running|degraded) log "booted bookworm in a container ($state)" ;;
    *) tail -n 30 "$work/console.log" >&2; die "the container did not boot ($state)" ;;
esac

# --- helpers ---------------------------------------------------------------------------------
wait_active() {  # the unit is active (Type=notify: READY=1 arrived) within 60 s
    for _ in $(seq 120); do
        in_ct systemctl is-active --quiet "$1" && return 0
        in_ct systemctl is-failed --quiet "$1" && break
        sleep 0.5
    done
    die "$1 is $(in_ct systemctl is-active "$1" || true)"
}
health() {  # GET /health from inside the container; prints the JSON
    in_ct python3 - <<'EOF'
import json, sys, urllib.request
with urllib.request.urlopen("http://127.0.0.1:8766/health", timeout=10) as resp:
    body = json.load(resp)
assert body.get("status") == "ok", body
print(json.dumps(body))
EOF
}
show() { in_ct systemctl show -P "$2" "$1"; }

# --- install ---------------------------------------------------------------------------------
log "apt install $(basename "$deb")"
in_ct apt-get update -q > "$work/apt.log" 2>&1 || { tail "$work/apt.log" >&2; die "apt-get update"; }
in_ct apt-get install -y -q --no-install-recommends /var/tmp/tokenpak.deb >> "$work/apt.log" 2>&1 \
    || { tail -n 30 "$work/apt.log" >&2; die "apt install failed"; }
if in_ct dpkg -s python3-tiktoken >/dev/null 2>&1; then die "python3-tiktoken got installed"; fi
wait_active tokenpak.service
log "ok: tokenpak.service is active (readiness from sd_notify)"
[ "$(in_ct systemctl is-enabled tokenpak.service)" = enabled ] || die "service not enabled"
[ "$(in_ct systemctl is-enabled tokenpak.socket || true)" = disabled ] || die "socket enabled"
[ "$(in_ct systemctl --global is-enabled tokenpak.service || true)" = disabled ] \
    || die "the user unit is enabled for every user"
log "ok: service enabled; tokenpak.socket and the user unit shipped but not enabled"
body=$(health) || die "GET /health failed"
log "ok: GET /health -> $body"
pid=$(show tokenpak.service MainPID)
# proxy.workers defaults to auto: one worker per core, supervised by the main process,
# which /health names whichever worker answers
cores=$(in_ct nproc)
instance=$(echo "$body" | python3 -c 'import json,sys; b=json.load(sys.stdin); print(b["pid"], b["workers"])')
[ "$instance" = "$pid $cores" ] || die "/health says pid/workers $instance, expected $pid $cores"
workers=$(in_ct cat "/proc/$pid/task/$pid/children" | wc -w)
[ "$cores" = 1 ] || [ "$workers" = "$cores" ] || die "$workers worker processes for $cores cores"
log "ok: $cores cores: the main process $pid supervises $workers workers"
uid=$(in_ct awk '/^Uid:/ {print $2}' "/proc/$pid/status")
[ "$uid" = "$(in_ct id -u tokenpak)" ] || die "main process runs as uid $uid, not tokenpak"
# /proc/net/tcp: state 0A = LISTEN; 0100007F:223E = 127.0.0.1:8766, 00000000:223E = *:8766
listening=$(in_ct awk '$4 == "0A" {print $2}' /proc/net/tcp)
echo "$listening" | grep -qx '0100007F:223E' || die "nothing listens on 127.0.0.1:8766"
if echo "$listening" | grep -qx '00000000:223E'; then die "listening on all addresses"; fi
in_ct test -d /var/lib/tokenpak || die "no /var/lib/tokenpak"
[ "$(in_ct stat -c %a:%G /etc/tokenpak/config.json)" = 640:tokenpak ] \
    || die "/etc/tokenpak/config.json should be 0640 root:tokenpak"
in_ct dpkg-query -W -f='${Conffiles}\n' tokenpak | grep -q /etc/tokenpak/config.json \
    || die "/etc/tokenpak/config.json is not a conffile"
in_ct test -f /usr/share/man/man1/tokenpak.1.gz || die "no man page"
log "ok: listens on 127.0.0.1 only, as user tokenpak; config is a 0640 conffile"

# --- watchdog, reload, restart ---------------------------------------------------------------
pet=$(show tokenpak.service WatchdogTimestampMonotonic)
sleep 17   # WatchdogSec=30: a keep-alive is due every 15 s
[ "$(show tokenpak.service WatchdogTimestampMonotonic)" != "$pet" ] \
    || die "no watchdog keep-alive (WATCHDOG=1) within 17 s"
log "ok: watchdog keep-alives arrive"

# A fake OpenAI on loopback inside the container; the conffile is edited to point at it and
# the change applied with a reload, so one request really goes through the sandboxed service.
cp "$work/fakeup.py" "$work/root/var/tmp/fakeup.py"
in_ct systemd-run --quiet --unit=fake-upstream python3 /var/tmp/fakeup.py "$fake_port"
in_ct python3 - "$fake_port" <<'EOF'
import json, sys
path = "/etc/tokenpak/config.json"
with open(path) as f:
    conf = json.load(f)
conf["proxy"]["providers"] = {"openai": {"url": "http://127.0.0.1:%s" % sys.argv[1]}}
with open(path, "w") as f:  # rewritten in place: keeps root:tokenpak 0640
    json.dump(conf, f, indent=2)
EOF
in_ct systemctl reload tokenpak.service || die "systemctl reload failed"
wait_active tokenpak.service
[ "$(show tokenpak.service MainPID)" = "$pid" ] || die "reload (SIGHUP) replaced the process"
health >/dev/null || die "GET /health after reload failed"
[ "$(in_ct cat "/proc/$pid/task/$pid/children" | wc -w)" = "$workers" ] \
    || die "the workers did not survive the reload"
log "ok: systemctl reload (SIGHUP) keeps pid $pid serving"
verdicts=$(in_ct python3 - <<'EOF'
import json, time, urllib.request

def post(body):
    return urllib.request.urlopen(urllib.request.Request(
        "http://127.0.0.1:8766/v1/chat/completions", json.dumps(body).encode(),
        {"Authorization": "Bearer sk-test-key", "Content-Type": "application/json"}), timeout=10)

# Streams go through the relay loop with Debian's urllib3, which then hands each upstream
# connection back to its pool: the requests after them reuse those connections.
for i in range(2):
    with post({"model": "gpt-4o", "stream": True,
               "messages": [{"role": "user", "content": "stream %d" % i}]}) as resp:
        lines = [line.decode().strip() for line in resp]
    events = [l[6:] for l in lines if l.startswith("data: ")]
    assert events[-1] == "[DONE]", lines
    text = "".join(c["delta"].get("content") or "" for e in events[:-1]
                   for c in json.loads(e)["choices"])
    assert text.startswith("pong"), lines
for i in range(4):
    with post({"model": "gpt-4o", "messages": [{"role": "user", "content": "after %d" % i}]}) as resp:
        assert json.load(resp)["choices"][0]["message"]["content"].startswith("pong")
body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "ping"}]})
verdicts = []
for attempt in range(2):  # a miss, then a hit in whichever worker takes the repeat
    req = urllib.request.Request("http://127.0.0.1:8766/v1/chat/completions", body.encode(),
                                 {"Authorization": "Bearer sk-test-key",
                                  "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        answer = json.load(resp)
        verdicts.append(resp.headers.get("X-TokenPak-Cache"))
    assert answer["choices"][0]["message"]["content"].startswith("pong"), answer
print(" ".join(map(str, verdicts)))
EOF
) || die "a request through the proxy failed"
[ "$verdicts" = "miss hit" ] || die "no cache miss then hit: $verdicts"
[ "$(in_ct stat -c %U /var/lib/tokenpak/tokenpak.db)" = tokenpak ] \
    || die "no database owned by tokenpak in /var/lib/tokenpak"
log "ok: streams relayed, then requests on the pooled connections; a request reached the upstream, then hit the cache ($verdicts)"
in_ct systemctl stop fake-upstream
in_ct systemctl restart tokenpak.service || die "systemctl restart failed"
wait_active tokenpak.service
[ "$(show tokenpak.service MainPID)" != "$pid" ] || die "restart kept the old process"
[ "$(show tokenpak.service NRestarts)" = 0 ] || die "the service restarted on its own"
health >/dev/null || die "GET /health after restart failed"
log "ok: systemctl restart -> new pid $(show tokenpak.service MainPID), /health answers"

# --- socket activation ------------------------------------------------------------------------
in_ct systemctl stop tokenpak.service
in_ct systemctl start tokenpak.socket
health >/dev/null || die "GET /health through the activation socket failed"
wait_active tokenpak.service
[ "$(show tokenpak.service TriggeredBy)" = tokenpak.socket ] || die "not triggered by the socket"
log "ok: socket activation: the first connection started the service and was answered"
in_ct systemctl stop tokenpak.socket tokenpak.service
in_ct systemctl start tokenpak.service
wait_active tokenpak.service

# --- purge -------------------------------------------------------------------------------------
in_ct apt-get purge -y -q tokenpak >> "$work/apt.log" 2>&1 \
    || { tail -n 30 "$work/apt.log" >&2; die "apt purge failed"; }
left=$(in_ct sh -c 'for f in /proc/[0-9]*/cmdline; do tr "\0" " " < "$f" 2>/dev/null; echo; done' \
       | grep -c 'bin/tokenpak' || true)
[ "$left" = 0 ] || die "a tokenpak process survived the purge"
if in_ct getent passwd tokenpak >/dev/null; then die "user tokenpak survived the purge"; fi
if in_ct getent group tokenpak >/dev/null; then die "group tokenpak survived the purge"; fi
for path in /var/lib/tokenpak /etc/tokenpak /lib/systemd/system/tokenpak.service \
            /etc/systemd/system/multi-user.target.wants/tokenpak.service /usr/bin/tokenpak; do
    if in_ct test -e "$path"; then die "$path survived the purge"; fi
done
if in_ct systemctl is-active --quiet tokenpak.service; then die "service still active"; fi
log "ok: apt purge left no process, user, group, state or unit"
log "PASS"
