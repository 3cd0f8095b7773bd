"""Who may call what (API keys, scopes), TLS, the audit log, and admission limits."""
