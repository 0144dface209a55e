"""Per-job secrets for the instance agent's reports.

The secret is derived (HMAC of the job id under the stage's signing key), so every
launch of the job renders the same user data and a retried RunInstances stays
idempotent; the job record keeps only its SHA-256.
"""

from __future__ import annotations

import hashlib
import hmac


def derive_secret(signing_key: str, job_id: str) -> str:
    return hmac.new(signing_key.encode(), f"spotctl-job:{job_id}".encode(), "sha256").hexdigest()


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(presented: str, stored_hash: str) -> bool:
    """Constant-time comparison of the presented secret's hash with the stored one."""
    return hmac.compare_digest(hash_secret(presented), stored_hash)
