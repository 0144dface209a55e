"""Every condition the control plane names, one class each.

Gateways turn AWS ``ClientError`` codes into these; ``app.py`` maps them to HTTP.
"""


class SpotctlError(Exception):
    """Base of every error the control plane raises on purpose."""


class InvalidJobSpec(SpotctlError):
    """A submitted job spec (or query) failed validation; the message names the field."""


class JobNotFound(SpotctlError):
    """No job has this id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id}")
        self.job_id = job_id


class NotConfigured(SpotctlError):
    """The deployment lacks a setting it needs (its operator's to fix, not the caller's)."""


class NotAuthenticated(SpotctlError):
    """The call carries no credentials this API accepts for the route."""


class RequestTooLarge(SpotctlError):
    """The request body (or a header) is over the API's size limit."""


class NotAuthorized(SpotctlError):
    """The caller's credentials do not allow this call."""


class InvalidTransition(SpotctlError):
    """The job's state does not allow the requested change."""


class SubmittedBefore(SpotctlError):
    """A job was submitted with this client token already."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"submitted before as job {job_id}")
        self.job_id = job_id


class TokenReused(SpotctlError):
    """A client token already made a job from a different spec."""


class VolumeClaimed(SpotctlError):
    """The volume a submission names is the data volume of a job still live."""


class Busy(SpotctlError):
    """Other writers kept changing what the request needed; asking again will do."""


class ConcurrentUpdate(SpotctlError):
    """Someone else wrote the job since we read it (DynamoDB condition failed)."""


class InsufficientCapacity(SpotctlError):
    """EC2 has no capacity for the requested pool right now."""


class SpotPriceTooLow(SpotctlError):
    """The max price we offered is below the current spot price of the pool."""


class VolumeBusy(SpotctlError):
    """The volume is attached, attaching or detaching; try again on the next pass."""


class ResourceMissing(SpotctlError):
    """An instance, volume or snapshot we recorded no longer exists."""


# EC2's answers that say "not now" rather than "never": throttling, its own faults, a
# quota or capacity that frees up. A pass that gets one fails and the next tries again.
TRANSIENT_EC2_CODES = frozenset(
    {
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "Unavailable",
        "InsufficientVolumeCapacity",
        "VolumeLimitExceeded",
    }
)


class Ec2Failure(SpotctlError):
    """EC2 refused a call for a reason we do not handle specially."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code

    @property
    def transient(self) -> bool:
        return self.code in TRANSIENT_EC2_CODES
