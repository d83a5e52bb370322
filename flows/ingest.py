"""The ingest flow: a photo-set source in, a new catalog version out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, unmapped
from prefect.utilities.annotations import quote
from tqdm import tqdm

from flows.engine import forget_results, in_batches, shared_results, workers_store
from flows.versioning import version_run
from subjectflow.catalog import Catalog, CatalogVersion
from subjectflow.config import Config, load_config
from subjectflow.ingest import IngestReport
from tasks.ingest import batch_key, list_source_task, plan_ingest_task, process_photos_task, record_ingest_task


@dataclass(frozen=True)
class IngestRun:
    report: IngestReport
    version: CatalogVersion | None


def config_for(catalog: Catalog, config: Config | None) -> Config:
    """The run's config: given by the caller, else the catalog's params.yaml + env."""
    return config if config is not None else load_config(catalog.params_file)


@flow(name="ingest", log_prints=True)
def ingest_flow(source: str, catalog: str, config: Config | None = None) -> IngestRun:
    root = Catalog.open(Path(catalog)).root
    config = config_for(Catalog.open(root), config)
    listing = list_source_task(source)
    # quote(): Prefect would walk every file of a listing, plan or result list, twice per
    # task call, looking for futures (2.3 s of a no-change refresh at 1,000 subjects).
    plan = plan_ingest_task(quote(listing), root, config.ingest)

    batches = in_batches(plan.todo, config.ingest.batch_size)
    store, settings, done = workers_store(config), config.ingest, iter(())
    if batches:  # saving the results' storage block is a call to the Prefect server
        batch_task = process_photos_task.with_options(result_storage=shared_results(config, root))
        if config.execution.engine == "local":  # a batch at a time, over this machine's worker processes
            done = (batch_task(batch, root, settings) for batch in batches)
        else:  # a task per batch, one process each: the engine spreads them over every worker
            settings = config.ingest.model_copy(update={"workers": 1})
            done = (f.result() for f in batch_task.map(batches, unmapped(root), unmapped(settings), unmapped(store)))
    results = []
    with tqdm(total=len(plan.todo), desc="ingest", unit="photo", disable=None) as progress:
        for batch, batch_results in zip(batches, done):
            results += batch_results
            progress.update(len(batch))

    report = record_ingest_task(root, quote(listing), quote(plan), quote(results), config.ingest, store)
    # Recorded: the next plan skips these photos, so the batches' kept results (there for a
    # run that dies before this point) would only pile up.
    forget_results(config, root, [batch_key(batch, root, settings) for batch in batches])
    get_run_logger().info(report.summary())
    version = version_run(root, report.summary(), config.versioning) if report.changed else None
    return IngestRun(report, version)
