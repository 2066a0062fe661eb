"""Fetch stage: one source shard -> ``resources/<dataset>/shards/<shard>.tar`` plus its stats.

``registry`` maps each source of ``datasets.<name>.source`` to its module's ``fetch(job, stats)``:
``synthetic`` (the embedded generator), ``local`` (existing tars), ``img2dataset`` (a URL list, cut by
``url_list``) and ``huggingface`` (a Hub release). ``repackage`` validates and copies samples for all of
them but ``synthetic``; ``http`` holds the one retry policy and the URL downloads. Nothing is imported
here, so ``powerclip.fetch.http`` can be used without the sources' dependencies.
"""
