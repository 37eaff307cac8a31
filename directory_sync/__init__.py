"""The RPPS / MSSanté directory: extract and FHIR sources, SQL models, diff sync, lookup."""
