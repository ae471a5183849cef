"""Process plumbing: structured logs with redaction, outbound HTTP, a local S3 server.

Imports only ``contract``."""
