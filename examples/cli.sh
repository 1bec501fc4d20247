#!/usr/bin/env bash
# The command line: run a dataset file against an OpenAI-compatible server, write the rows to
# a CSV file, and list the stored runs. The server is nbllm's test server on this machine
# (no key, no network); with a real one, pass its --api-base and --model, or a provider's
# model (--model openai/gpt-4o-mini) with its key in the environment.
#
#     bash examples/cli.sh          (writes results.csv in the current folder)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log="$(mktemp)"

# 1. Start the test server in the background. It prints one line once it listens:
#    "nbllm test server listening on URL".
python -m nbllm.testing --latency 0.01 >"$log" 2>&1 &
server=$!
stop_server() {
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    rm -f "$log"
}
trap stop_server EXIT

url=""
for _ in $(seq 100); do
    url="$(sed -n 's/^nbllm test server listening on //p' "$log")"
    [ -n "$url" ] && break
    sleep 0.1
done
if [ -z "$url" ]; then
    echo "the test server did not start:" >&2
    cat "$log" >&2
    exit 1
fi
echo "server: $url"

# 2. Run the dataset: the summary goes to stdout, the rows to results.csv. Exit code 0 means
#    every turn succeeded (1: some failed, 2: bad data or option, nothing sent).
nbllm run "$here/data/finqa_sample.jsonl" --model nbllm-test --api-base "$url" \
    --out results.csv --no-progress
echo "results.csv: $(($(wc -l <results.csv) - 1)) rows"

# 3. The stored runs (under $NBLLM_DIR, or ./.nbllm): running the same command again would
#    read every answer back from its checkpoint. `nbllm runs rm ID` removes one.
nbllm runs

# 4. The server stops on exit (the trap above).
