"""Knowledge bases the bot answers from: documents in (`ingest`), cut along their structure
(`chunking`), kept in SQL (`store`), searched in memory in every process (`index`, `search`),
and handed to a round (`round_context`) or offered as a tool."""
