//! The demo store passes openraft's storage test suite.
#![cfg(feature = "app")]

use openraft::StorageError;
use openraft::testing::log::StoreBuilder;
use openraft::testing::log::Suite;
use raftwire::kv::KvConfig;
use raftwire::kv::LogStore;
use raftwire::kv::StateMachine;

struct Fresh;

impl StoreBuilder<KvConfig, LogStore, StateMachine> for Fresh {
    async fn build(&self) -> Result<((), LogStore, StateMachine), StorageError<KvConfig>> {
        Ok(((), LogStore::default(), StateMachine::default()))
    }
}

#[tokio::test]
async fn demo_store_passes_openraft_suite() -> Result<(), StorageError<KvConfig>> {
    Suite::test_all(Fresh).await
}
