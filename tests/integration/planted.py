"""Credentials planted by the secrets-by-value checks (issue 24 #7), shared by
tests/integration/test_secrets_by_value.py and the fault campaign's `secrets` section: one of
each provider format plus a URL password and a private-key block. They are fake (no provider
issued them) and carry `Pl4nted`/`pl4nted` so that a hit is unmistakable."""

from __future__ import annotations

from pathlib import Path

DB_PW = "Pl4ntedDbPassw0rd"
GH = "ghp_" + "Pl4nted0GitHub0Token0Value0000000001"
OPENAI = "sk-proj-" + "Pl4ntedOpenAIStyleKey0000000002"
ANTHROPIC = "sk-ant-api03-" + "Pl4ntedAnthropicKey00000000000003"
HF = "hf_" + "Pl4ntedHuggingFaceToken0000000004"
AWS = "AKIAPL4NTEDAWSKEY005"
SLACK = "xoxb-1234567890-0987654321-pl4ntedslacktoken6"
GITLAB = "glpat-" + "Pl4ntedGitLabToken0007"
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJwbDRudGVkIiwiaWF0IjoxfQ."
       "Pl4ntedJwtSignature0008abcdefghijklmnopq")
KEY_BODY = "MIIEpl4ntedPRIVATEkeyBODY0009"
PRIVATE = f"-----BEGIN RSA PRIVATE KEY-----\n{KEY_BODY}\n-----END RSA PRIVATE KEY-----"
PLANTED = (DB_PW, GH, OPENAI, ANTHROPIC, HF, AWS, SLACK, GITLAB, JWT, KEY_BODY)
#: what each planted value is, for reports that must not print the value itself
KINDS = {DB_PW: "URL password", GH: "GitHub token", OPENAI: "OpenAI-style sk- key", ANTHROPIC: "Anthropic sk-ant- key",
         HF: "Hugging Face token", AWS: "AWS access key id", SLACK: "Slack token", GITLAB: "GitLab token",
         JWT: "JWT", KEY_BODY: "private-key block"}


def scan(*roots: Path) -> list[tuple[str, str]]:
    """(file, kind) for every planted value found in any byte of any file under `roots`, and in
    the decoded values of every Parquet file (a compressed page hides its text from a byte
    search). Paths are given relative to their root."""
    import pyarrow.parquet as pq

    hits: list[tuple[str, str]] = []
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            rel = p.name if p == root else str(p.relative_to(root))
            texts = [p.read_bytes()]
            if p.suffix == ".parquet":
                try:
                    texts.append(str(pq.read_table(p).to_pylist()).encode())
                except Exception as exc:  # noqa: BLE001 - a segment that cannot be decoded is a finding too
                    hits.append((rel, f"undecodable Parquet ({type(exc).__name__})"))
            for secret in PLANTED:
                if any(secret.encode() in t for t in texts):
                    hits.append((rel, KINDS[secret]))
    return hits
