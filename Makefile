# The two commands a fresh machine needs: `make demo` and `make test`.
.PHONY: setup demo test

setup:
	@scripts/setup.sh

# Build the example LM from its seed, compile it for this host and for a Raspberry Pi 4,
# and run the host artifact.
demo: setup
	.venv/bin/edgecc example tiny-lm -o out/tiny-lm.onnx
	.venv/bin/edgecc compile out/tiny-lm.onnx --target host -o out/tiny-lm-host --force
	.venv/bin/edgecc compile out/tiny-lm.onnx --target rpi4 -o out/tiny-lm-rpi4 --force
	.venv/bin/edgecc run out/tiny-lm-host --dim seq=32

# The emulation tier needs the cached aarch64 environment; build it first when missing.
test: setup
	.venv/bin/edgecc emulator setup >/dev/null || echo "aarch64 emulator unavailable: emulation tests will skip" >&2
	.venv/bin/python -m pytest -q
