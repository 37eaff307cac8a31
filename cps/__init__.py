"""CPS smart cards over PC/SC: the CPS3 (IAS-ECC) command set and an async card worker."""
