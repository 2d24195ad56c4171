"""A queued job's hub token, kept across a restart of the app without ever lying on disk in clear.

The token is encrypted (Fernet: AES-128-CBC with an HMAC-SHA256 tag) with a key of this app's own,
`<data_dir>/app.key`, created once with owner-only permissions; the database holds only the ciphertext, and only
while the job waits. The worker decrypts it when the job starts, hands it to the run as HF_TOKEN and the ciphertext
is deleted. A copy of app.db alone (a backup, a bug report) therefore reveals nothing; whoever can read both files
is the user the app runs as, who could read the token from the process anyway.
"""

from __future__ import annotations

import os
from pathlib import Path

KEY_FILE = "app.key"


class Vault:
    """Encrypts and decrypts short secrets with the app's key (made on first use)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / KEY_FILE
        self._fernet = None

    def _cipher(self):
        from cryptography.fernet import Fernet

        if self._fernet is None:
            if not self.path.is_file():
                # Written whole to a private file, then linked into place: a second app starting at the same moment
                # either wins the link or reads the complete key of the first, never half of one.
                temp = self.path.with_name(f".{KEY_FILE}.{os.getpid()}")
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(Fernet.generate_key())
                try:
                    os.link(temp, self.path)
                except FileExistsError:
                    pass
                finally:
                    temp.unlink()
            if self.path.stat().st_mode & 0o077:
                os.chmod(self.path, 0o600)  # a key others can read protects nothing: made owner-only again
            self._fernet = Fernet(self.path.read_bytes().strip())
        return self._fernet

    def seal(self, secret: str) -> str:
        return self._cipher().encrypt(secret.encode()).decode("ascii")

    def open(self, sealed: str) -> str | None:
        """The secret, or None when it cannot be read back (the key file was replaced or removed)."""
        from cryptography.fernet import InvalidToken

        try:
            return self._cipher().decrypt(sealed.encode("ascii")).decode()
        except (InvalidToken, ValueError):
            return None
