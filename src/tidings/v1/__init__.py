"""Generated code for the gRPC API, ``proto/tidings/v1/tidings.proto``: do not edit.

Regenerate with ``make proto``; ``tests/test_proto.py`` fails when these files are out of date.
"""
