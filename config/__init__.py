"""The gateway's configuration: a schema of frozen dataclasses and a TOML loader."""
