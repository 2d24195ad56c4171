"""`tunelab app`: a local web app to fine-tune without code, on the same engine as the CLI.

New project (task, base model, data) -> data preview and column mapping (the dry run's code) -> parameters ->
Start Training; the job then runs in a background worker, watched live (log, loss chart), and when it is done its
metrics, evaluation report, download and a chat box are on its page. See docs/app.md.

The modules, one concern each: server (app factory, login/Host/CSRF guard), pages (HTML), api (JSON), projects
(what the forms do), params (the form from LLMParams), preview (the plan), uploads (files and paths in), jobs
(SQLite), worker (the job processes), results (log, metrics, zip), chat (the model behind the chat box),
security, render (template filters).
"""

from tunelab.app.server import create_app, run_app

__all__ = ["create_app", "run_app"]
