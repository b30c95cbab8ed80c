"""Sluice: an SMTP gateway appliance.

The package follows the path of a message: `inbound` (the bridge to the Rust listener),
`policy`, `trace`, `queue`, `delivery` (routing, SMTP client, scheduler), `bounce`, then the
operator surfaces (`cli`, `eventlog`, `metrics`).
"""

__version__ = "0.1.0"
