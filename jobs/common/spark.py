"""The Spark session every Spark stage starts the same way."""

from __future__ import annotations

import logging
import os

from jobs.common import cli, settings

logger = logging.getLogger(__name__)


def session(app_name: str, shuffle_partitions: int | None = None):
    """A Spark session in UTC, on ``ADFRAUD_SPARK_MASTER`` (``local[*]`` by default).

    Locally the driver binds to loopback and the UI is off; on a cluster the master URL
    and the ``spark.kubernetes.*`` settings come from ``spark-submit`` or the Spark
    Operator, and this function leaves them alone.
    """
    from pyspark.sql import SparkSession

    master = os.environ.get(settings.SPARK_MASTER_ENV_VAR, settings.DEFAULT_SPARK_MASTER)
    memory_mb = cli.int_env(settings.SPARK_DRIVER_MEMORY_MB_ENV_VAR, settings.DEFAULT_SPARK_DRIVER_MEMORY_MB)
    builder = (
        SparkSession.builder.appName(app_name)
        .master(master)
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.driver.memory", f"{memory_mb}m")
        .config("spark.sql.shuffle.partitions", str(shuffle_partitions or (os.cpu_count() or 2) * 2))
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        .config("spark.sql.adaptive.enabled", "true")
    )
    if master.startswith("local"):
        # Keep a local driver on loopback whatever the host name resolves to.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        builder = (
            builder.config("spark.driver.host", "127.0.0.1")
            .config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
        )
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    logger.info("spark %s on %s", spark.version, master)
    return spark
