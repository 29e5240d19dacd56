"""Knowledge bases the bot answers from: documents in (`ingest`), cut along their structure
(`chunking`), kept in SQL (`store`), indexed and searched in memory in every process (`index`,
`retrieval`), and handed to a round or offered to it as a tool (`for_rounds`)."""
