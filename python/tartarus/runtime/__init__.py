"""The unified runtime: one `Runtime` protocol over the microVM, gVisor, jail and wasm
backends, and the selector that picks one for a workload."""
