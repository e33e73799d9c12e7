"""The operator console at /console: server-rendered pages (Jinja2, SVG charts) and a little
JavaScript of our own, behind a login with an admin API key and a session of its own."""
