"""The one logger: Powertools, JSON lines, service "spotctl"; boto quiet."""

import logging

from aws_lambda_powertools import Logger

logger = Logger(service="spotctl")

for noisy in ("boto3", "botocore", "urllib3"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
