"""SQL: the query record and error classification of every driver (:mod:`agent.sql.record`)
and PostgreSQL's timeout policy under a deadline (:mod:`agent.sql.postgres`). The
drivers' own glue is in :mod:`agent.instrumentation`.
"""
