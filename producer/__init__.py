"""What application code imports: data connectors, estimators, distributor, job handles."""
from common.errors import TrainingFailedError
from producer.connectors import DataConnector, ShardedDataConnector
from producer.jobs import JobStatus, TrainingJob

__all__ = ["DataConnector", "ShardedDataConnector", "TrainingJob", "TrainingFailedError", "JobStatus"]
