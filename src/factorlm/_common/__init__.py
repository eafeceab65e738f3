"""Shared plumbing with one home: files, ONNX Runtime sessions, text to feeds, user inputs, outputs.

Every package may import from here; nothing here imports a stage package (export, compress,
build, benchmark, recover, pipeline), so the dependency arrows run one way.
"""
