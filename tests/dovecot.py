"""A private Dovecot for tests: its own config, users, ports, maildirs and TLS certificate.

Everything lives in one temp dir and runs as the current user (no /etc, /var or root-only
paths), on free loopback ports: plain IMAP (for STARTTLS and LOGIN) and IMAPS. Mail is
delivered with Dovecot's own LDA (``dovecot-lda``), as a real MTA would hand it over.

XOAUTH2 is checked for real too: Dovecot's ``oauth2`` passdb asks a tiny local introspection
endpoint (``Introspection``) whether a bearer token is active, the way it would ask Google's or
Keycloak's.
"""

from __future__ import annotations

import contextlib
import getpass
import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

from tracer.sandbox.redis_process import free_port, wait_port

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
LDA = next(
    (p for p in ("/usr/lib/dovecot/dovecot-lda", "/usr/lib/dovecot/deliver") if os.path.exists(p)), None
)
HOW_TO_GET = "Dovecot is not installed: apt-get install dovecot-imapd (CI's .ci/run does)"


def available() -> bool:
    return os.path.exists(DOVECOT) and LDA is not None and shutil.which("openssl") is not None


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


class Introspection:
    """An OAuth2 token introspection endpoint (RFC 7662) that knows one token per user."""

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}
        tokens = self.tokens

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                token = (parse_qs(raw).get("token") or [""])[0]
                user = tokens.get(token)
                body = json.dumps({"active": True, "username": user} if user else {"active": False}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/introspect"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Dovecot:
    """``start()`` / ``stop()`` / ``kill()``; ``deliver(user, raw)``; users ``ana`` and ``bob``."""

    USERS = {"ana": "ana-secret", "bob": "bob-secret"}

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ft-dovecot-"))
        self.imap_port = free_port()
        self.imaps_port = free_port()
        self.introspection = Introspection()
        self.proc: subprocess.Popen[bytes] | None = None
        self._write()

    @property
    def cert(self) -> str:
        return str(self.dir / "cert.pem")

    def token_for(self, user: str) -> str:
        token = f"ya29.test-{user}-{os.urandom(6).hex()}"
        self.introspection.tokens[token] = user
        return token

    def _write(self) -> None:
        d = self.dir
        for sub in ("run", "state", "mail", "home"):
            (d / sub).mkdir()
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
             "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
            check=True, capture_output=True,
        )  # fmt: skip
        (d / "passwd").write_text("".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in self.USERS.items()))
        (d / "oauth2.conf.ext").write_text(
            f"introspection_mode = post\nintrospection_url = {self.introspection.url}\n"
            "username_attribute = username\nactive_attribute = active\nactive_value = true\n"
            "tokeninfo_url = \nforce_introspection = yes\n"
        )
        user, uid, gid = getpass.getuser(), os.getuid(), os.getgid()
        if uid == 0:
            # Dovecot refuses root for its login processes and mail users; as root (a CI
            # container), run them as an unprivileged account and give it the temp dir.
            pw = next(pwd.getpwnam(n) for n in ("dovenull", "nobody") if _has_user(n))
            user, uid, gid = pw.pw_name, pw.pw_uid, pw.pw_gid
            for path in [d, *d.rglob("*")]:
                os.chown(path, uid, gid)
        group = grp.getgrgid(gid).gr_name
        (d / "dovecot.conf").write_text(f"""
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = yes
ssl_cert = <{d}/cert.pem
ssl_key = <{d}/key.pem
disable_plaintext_auth = no
auth_mechanisms = plain login xoauth2
default_internal_user = {user}
default_internal_group = {group}
default_login_user = {user}
first_valid_uid = {min(uid, 500)}
first_valid_gid = {min(gid, 500)}
mail_location = maildir:{d}/mail/%u
mail_uid = {uid}
mail_gid = {gid}
imap_idle_notify_interval = 2 mins
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/passwd
  mechanisms = plain login
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2
  args = {d}/oauth2.conf.ext
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={d}/home/%u allow_all_users=yes
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.imaps_port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
service stats {{
  unix_listener stats-reader {{
    user = {user}
  }}
  unix_listener stats-writer {{
    user = {user}
  }}
}}
namespace inbox {{
  inbox = yes
  mailbox Trash {{
    auto = create
    special_use = \\Trash
  }}
}}
protocol imap {{
  mail_max_userip_connections = 100
}}
""")

    def start(self) -> Dovecot:
        self.proc = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.dir / "dovecot.conf")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            wait_port(self.imap_port, 10)
            wait_port(self.imaps_port, 10)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"dovecot did not start: {self.log()[-2000:]}") from exc
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """An outage: SIGKILL to the master and every process it forked (its own session)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            self.proc = None

    def close(self) -> None:
        self.stop()
        self.introspection.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        p = self.dir / "dovecot.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def deliver(self, user: str, raw: bytes, folder: str | None = None) -> None:
        """Hand one mail to Dovecot's LDA, like an MTA's final delivery step."""
        assert LDA is not None
        args = [LDA, "-c", str(self.dir / "dovecot.conf"), "-d", user, "-f", "funnel@funnel.invalid"]
        if folder:
            args += ["-m", folder]
        proc = subprocess.run(args, input=raw, capture_output=True, timeout=20)
        if proc.returncode != 0:
            raise RuntimeError(f"dovecot-lda failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")

    def write_maildir(self, user: str, raw: bytes) -> None:
        """Put a mail straight into the user's maildir ``new/``, as an MTA's local delivery does:
        for mail that lands while the IMAP server is down (dovecot-lda needs its auth service)."""
        new = self.dir / "mail" / user / "new"
        tmp = self.dir / "mail" / user / "tmp"
        name = f"{int(time.time())}.M{os.urandom(4).hex()}P{os.getpid()}.test"
        (tmp / name).write_bytes(raw)
        st = self.dir.stat()
        os.chown(tmp / name, st.st_uid, st.st_gid)
        os.rename(tmp / name, new / name)


class SmtpRelay:
    """An MTA in front of the Dovecot: accepts SMTP (aiosmtpd, own thread) and hands every mail
    to ``dovecot-lda`` for each recipient's local part, so the sandbox funnel's approval mail
    reaches the real mailbox the way it would in production."""

    def __init__(self, d: Dovecot) -> None:
        from aiosmtpd.controller import Controller

        dove = d

        class Handler:
            async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
                import asyncio

                raw = envelope.original_content or b""  # type: ignore[attr-defined]
                for rcpt in envelope.rcpt_tos:  # type: ignore[attr-defined]
                    user = rcpt.split("@")[0]
                    if user not in dove.USERS:
                        return "550 no such user"
                    await asyncio.to_thread(dove.deliver, user, raw)
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()
