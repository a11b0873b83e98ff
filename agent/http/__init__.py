"""HTTP: the outgoing-call protocol of every client (:mod:`agent.http.client`, errors in
:mod:`agent.http.errors`) and the incoming-request protocol of every server
(:mod:`agent.http.server`). The libraries' own glue is in :mod:`agent.instrumentation`.
"""
