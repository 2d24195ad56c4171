"""`tunelab app`: a local web app to fine-tune without code, on the same engine as the CLI.

New project (an LLM method or text classification, base model, data) -> data preview and column mapping (the dry
run's code) -> parameters -> Start Training; the job then runs in a background worker, watched live (log, the
charts its method logs), and when it is done its metrics, evaluation, download, chat or predict box, base beside
tuned, export and push are on its page. Runs of any project can be compared. See docs/app.md.

The modules, one concern each: server (app factory, login/Host/CSRF guard), pages (HTML), api (JSON), projects
(what the forms do), params (the form from the task's schema), preview (the plan), uploads (files and paths in),
jobs (SQLite), vault (a queued job's token, sealed), worker (the job processes), results (log, metrics, zip),
charts (which series each chart draws), compare (runs side by side), classification (a classifier's results),
chat (the models behind the chat, side-by-side and predict boxes), exports (export and push in the background),
machine (the machine panel), security, render (template filters).
"""

from tunelab.app.server import create_app, run_app

__all__ = ["create_app", "run_app"]
