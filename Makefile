# The two commands a fresh machine needs: `make demo` and `make test`.
.PHONY: setup demo test test-long

setup:
	@scripts/setup.sh

# Export SmolLM2-135M-Instruct with a KV cache (once, into ~/.cache/edgecc/examples), compile it
# for this host (checked against ONNX Runtime) and generate text with the artifact.
demo: setup
	model=$$(.venv/bin/edgecc example smollm2 --print-path) && \
	.venv/bin/edgecc compile "$$model" --target host -o out/smollm2-host --force
	.venv/bin/edgecc generate out/smollm2-host --prompt "The capital of France is" --max-new-tokens 16

test: setup
	.venv/bin/python -m pytest -q

# The long tiers CI runs after `make test`: every transformers architecture x exporter, the ONNX
# backend node tests, five thousand more fuzz cases, the aarch64 checks under qemu (which need the
# cached aarch64 environment; built first when missing) and the long tuning sessions.
test-long: setup
	.venv/bin/edgecc emulator setup >/dev/null || echo "aarch64 emulator unavailable: emulation tests will skip" >&2
	.venv/bin/python -m pytest -q -m "models or conformance or fuzz or emulation or tuning"
