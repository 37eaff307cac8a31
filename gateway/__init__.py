"""The composition root: SMTP servers, spool and queue, workers, Dovecot, CLI."""
