"""The RPPS / MSSanté directory: extract and FHIR sources, SQL models, diff sync, lookup.

What the gateway uses (DESIGN.md flows 1 and 3):

- `database.make_engine(url)` / `engine_from_config(cfg.database)`, then `database.migrate(engine)`
  (Alembic, version table `directory_alembic_version`).
- `lookup.DirectoryLookup(engine)`: `await lookup(address) -> Recipient | None` at RCPT time;
  raises `errors.DirectoryUnavailable` when the database cannot answer (reply `451 4.4.3`).
- `whitelist.TrustSpace(engine)`: `reload()`, then `is_trust_space_domain(domain)` and
  `operator_dn(domain)` for inbound peers and outbound relays.
- `sync.import_paths(engine, paths)`, `whitelist.import_whitelist(engine, path)` and
  `fhir.sync_fhir(engine, FhirClient(settings))` keep it current; blocking calls, so an async
  caller runs them in a thread (`asyncio.to_thread`).
"""
