"""Shared test support: real sockets, real servers, real subprocesses."""
