"""What a device needs to run an artifact: loading and checking it, its weights, LiteRT for Edge TPU
artifacts, a module run out of harm's way, and the aarch64 emulator."""
