"""The `data` settings every trainer with prepared data shares: where the prepared dataset is and how workers read
it. They are reading options: changing them never calls for preparing the data again."""

from typing import Literal

from pydantic import Field, model_validator

from ddl_apps.recipe import Section

AUTO = "auto"


class PreparedData(Section):
    prepared: str = Field(AUTO, description="a prepared dataset (a folder, or an s3:// URL) made by 'ddl data "
                          "prepare'; 'auto' prepares one into the cache on first use and reuses it while the source "
                          "and the data section are unchanged")
    stream: bool = Field(True, description="each worker reads only the chunks of its own examples; false: each "
                         "worker loads the whole prepared split into memory (same examples, same order)")
    shuffle: Literal["chunks", "full"] = Field("chunks", description="'chunks': a new order of chunks, and of examples "
                                               "within each, every epoch; 'full': a full permutation (with "
                                               "data.stream=false only)")
    lanes: int = Field(16, ge=1, description="streams a global step draws from; workers read disjoint lanes when "
                       "their number divides this")
    cache_gb: float = Field(20.0, ge=0, description="local cache of chunks read from object storage, in GiB")

    @model_validator(mode="after")
    def _full_shuffle_in_memory(self):
        if self.shuffle == "full" and self.stream:
            raise ValueError("data.shuffle=full draws every step from every chunk, so a streamed split would read "
                             "the whole dataset for each step; set data.stream=false to load it into memory, or keep "
                             "data.shuffle=chunks")
        return self


READING_OPTIONS = frozenset(PreparedData.model_fields)


class OptionalPreparedData(PreparedData):
    """For trainers that can also read their source directly (every worker all of it): preparing is chosen."""

    prepared: str | None = Field(None, description="a prepared dataset (a folder, or an s3:// URL) made by 'ddl "  # type: ignore[assignment]
                                 "data prepare': each worker streams its examples from the shards, decoding them in "
                                 "the input pipeline; 'auto' prepares one into the cache on first use; none: every "
                                 "worker reads and decodes the whole source first")
