#!/usr/bin/env bash
# Open an HTML report in headless Chromium, fail on console errors, uncaught exceptions,
# failed loads or any request that leaves the machine, and take a full-page screenshot.
#
#   scripts/check_report_in_browser.sh REPORT.html [SCREENSHOT.png]
#
# Installs Debian's `chromium` with apt-get when no Chromium/Chrome is on PATH (root, or sudo).
# The browser runs with a fresh profile and no background networking; the page is driven over
# the DevTools protocol on a pipe (--remote-debugging-pipe: no port, no extra package), which
# reports console messages with their level, exceptions, and every network request.
# Exit: 0 ok; 1 errors found; 2 bad usage / no browser.
set -euo pipefail

usage() { echo "usage: $0 REPORT.html [SCREENSHOT.png]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
report=$1
[ -f "$report" ] || { echo "$0: no such file: $report" >&2; exit 2; }
shot=${2:-${report%.html}.png}
report_abs=$(cd "$(dirname "$report")" && pwd)/$(basename "$report")
mkdir -p "$(dirname "$shot")"
shot_abs=$(cd "$(dirname "$shot")" && pwd)/$(basename "$shot")

find_browser() {
  for b in chromium chromium-browser google-chrome google-chrome-stable chrome; do
    if command -v "$b" >/dev/null 2>&1; then command -v "$b"; return 0; fi
  done
  return 1
}

if ! browser=$(find_browser); then
  echo "$0: no Chromium found; installing Debian's chromium with apt-get" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "$0: need root or sudo to install chromium" >&2; exit 2; }
    SUDO="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null
  $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
  browser=$(find_browser) || { echo "$0: chromium did not install" >&2; exit 2; }
fi

here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-}
[ -n "$py" ] || { [ -x "$here/.venv/bin/python" ] && py=$here/.venv/bin/python; } || true
[ -n "$py" ] || py=python3

profile=$(mktemp -d "${TMPDIR:-/tmp}/k2repro-chromium.XXXXXX")
trap 'rm -rf "$profile"' EXIT

"$py" - "$browser" "$profile" "$report_abs" "$shot_abs" <<'PY'
"""A minimal DevTools-protocol client over --remote-debugging-pipe (fd 3: commands in,
fd 4: messages out, each a JSON text ending in NUL). Standard library only."""
import base64, fcntl, json, os, select, subprocess, sys, time

browser, profile, report, shot = sys.argv[1:5]
flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars",
         f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]

cmd_r, cmd_w = os.pipe()
out_r, out_w = os.pipe()
# park the child's ends above fd 10 so dup2 onto 3 and 4 never collides with them
cmd_r_hi = fcntl.fcntl(cmd_r, fcntl.F_DUPFD_CLOEXEC, 10)
out_w_hi = fcntl.fcntl(out_w, fcntl.F_DUPFD_CLOEXEC, 10)
os.close(cmd_r); os.close(out_w)

def child_fds():
    os.dup2(cmd_r_hi, 3)  # dup2 makes 3 and 4 inheritable
    os.dup2(out_w_hi, 4)

proc = subprocess.Popen([browser, *flags], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=open(os.path.join(profile, "stderr.log"), "wb"),
                        close_fds=False, preexec_fn=child_fds)
os.close(cmd_r_hi); os.close(out_w_hi)

buf = b""
next_id = 0
events = []

def send(method, params=None, session=None):
    global next_id
    next_id += 1
    msg = {"id": next_id, "method": method, "params": params or {}}
    if session:
        msg["sessionId"] = session
    os.write(cmd_w, json.dumps(msg).encode() + b"\0")
    return next_id

def pump(timeout):
    """Read messages for up to `timeout` seconds; returns them."""
    global buf
    got = []
    end = time.time() + timeout
    while True:
        left = end - time.time()
        if left <= 0:
            break
        r, _, _ = select.select([out_r], [], [], left)
        if not r:
            break
        chunk = os.read(out_r, 1 << 20)
        if not chunk:
            break
        buf += chunk
        while b"\0" in buf:
            raw, buf = buf.split(b"\0", 1)
            got.append(json.loads(raw))
        if got and timeout == 0:
            break
    return got

def call(method, params=None, session=None, timeout=30):
    i = send(method, params, session)
    end = time.time() + timeout
    while time.time() < end:
        answer = None
        for m in pump(0.5):
            if m.get("id") == i:
                answer = m
            else:
                events.append(m)
        if answer is not None:
            if "error" in answer:
                raise SystemExit(f"check_report: {method} failed: {answer['error']}")
            return answer.get("result", {})
    raise SystemExit(f"check_report: no answer to {method} in {timeout}s")

errors = []
try:
    target = call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for dom in ("Runtime", "Log", "Network", "Page"):
        call(f"{dom}.enable", session=session)
    call("Emulation.setDeviceMetricsOverride",
         {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
    call("Page.navigate", {"url": "file://" + report}, session=session)
    loaded = any(m.get("method") == "Page.loadEventFired" for m in events)
    end = time.time() + 60
    while time.time() < end and not loaded:
        for m in pump(0.5):
            events.append(m)
            loaded = loaded or m.get("method") == "Page.loadEventFired"
    if not loaded:
        errors.append("the page did not finish loading in 60 s")
    events.extend(pump(1.0))  # late console messages
    metrics = call("Page.getLayoutMetrics", session=session)
    size = metrics.get("cssContentSize") or metrics.get("contentSize") or {}
    height = int(min(max(size.get("height", 900), 900), 12000))
    call("Emulation.setDeviceMetricsOverride",
         {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
    png = call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
               session=session, timeout=60)["data"]
    with open(shot, "wb") as f:
        f.write(base64.b64decode(png))
    n_img = call("Runtime.evaluate", {"expression": "document.images.length", "returnByValue": True},
                 session=session)["result"].get("value")
    broken = call("Runtime.evaluate", {"expression":
                  "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length",
                  "returnByValue": True}, session=session)["result"].get("value")
    title = call("Runtime.evaluate", {"expression": "document.title", "returnByValue": True},
                 session=session)["result"].get("value")
    events.extend(pump(0.2))
finally:
    try:
        send("Browser.close")
        proc.wait(timeout=10)
    except Exception:
        proc.kill()

for m in events:
    meth, p = m.get("method"), m.get("params", {})
    if meth == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
        text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
        errors.append(f"console.{p['type']}: {text}")
    elif meth == "Runtime.exceptionThrown":
        d = p.get("exceptionDetails", {})
        errors.append("uncaught exception: " + (d.get("exception", {}).get("description") or d.get("text", "")))
    elif meth == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
        e = p["entry"]
        errors.append(f"log error ({e.get('source')}): {e.get('text')} {e.get('url', '')}".strip())
    elif meth == "Network.requestWillBeSent":
        url = p.get("request", {}).get("url", "")
        if not url.startswith(("file:", "data:", "about:", "blob:")):
            errors.append(f"request leaves the machine: {url}")
    elif meth == "Network.loadingFailed":
        errors.append(f"load failed: {p.get('errorText')}")
if broken:
    errors.append(f"{broken} image(s) failed to render")
print(f"report: {report}")
print(f"title: {title!r}; images: {n_img}; screenshot: {shot} ({os.path.getsize(shot)} bytes)")
if errors:
    print("FAILED:", file=sys.stderr)
    for e in dict.fromkeys(errors):
        print(f"  {e}", file=sys.stderr)
    sys.exit(1)
print("ok: no console errors, no failed loads, no external requests")
PY
echo "browser: $("$browser" --version 2>/dev/null | head -1)"
