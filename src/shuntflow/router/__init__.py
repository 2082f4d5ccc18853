"""The per-host router: hands host TCP connections to the preload library (docs/wire.md)."""
