//! Context isolation: interleaved tasks on tokio (multi-thread) and glommio each see
//! only their own request ID across awaits; spawned tasks inherit; nothing stays bound.

use std::time::Duration;

use appproxy_shared::context::{background, inherit, scope};
use appproxy_shared::{current_request_id, IdVersion, RequestId};

const TASKS: usize = 1_000;

fn id_for(i: usize) -> RequestId {
    format!("task-{i}").parse().expect("valid id")
}

#[test]
fn tokio_multi_thread_isolation_and_inheritance() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        assert_eq!(current_request_id(), None);
        let mut handles = Vec::with_capacity(TASKS);
        for i in 0..TASKS {
            let id = id_for(i);
            handles.push(tokio::spawn(scope(Some(id), async move {
                for round in 0..5u64 {
                    assert_eq!(current_request_id(), Some(id), "before await {round}");
                    if (i as u64 + round) % 3 == 0 {
                        tokio::time::sleep(Duration::from_micros(50)).await;
                    } else {
                        tokio::task::yield_now().await;
                    }
                    assert_eq!(current_request_id(), Some(id), "after await {round}");
                }
                // The shared spawn helper hands the ID to a child task, even one that
                // lands on another worker thread.
                let child = appproxy_shared::context::spawn(async move {
                    tokio::task::yield_now().await;
                    current_request_id()
                });
                assert_eq!(child.await.expect("child"), Some(id));
                // Blocking work sees the ID too.
                let blocking = appproxy_shared::context::spawn_blocking(current_request_id);
                assert_eq!(blocking.await.expect("blocking"), Some(id));
                // A task spawned without the helper does not inherit.
                let bare = tokio::spawn(async { current_request_id() });
                assert_eq!(bare.await.expect("bare"), None);
                i
            })));
        }
        let mut seen = 0;
        for h in handles {
            seen += h.await.expect("task") + 1;
        }
        assert_eq!(seen, TASKS * (TASKS + 1) / 2);
        assert_eq!(current_request_id(), None, "nothing bound after the scopes");
    });
}

#[test]
fn glommio_executor_isolation_and_inheritance() {
    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(512 << 10)
        .make()
        .expect("executor");
    ex.run(async {
        let mut tasks = Vec::with_capacity(TASKS);
        for i in 0..TASKS {
            let id = id_for(i);
            tasks.push(glommio::spawn_local(scope(Some(id), async move {
                for round in 0..5u64 {
                    assert_eq!(current_request_id(), Some(id));
                    if (i as u64 + round) % 7 == 0 {
                        glommio::timer::sleep(Duration::from_micros(100)).await;
                    } else {
                        futures_lite::future::yield_now().await;
                    }
                    assert_eq!(current_request_id(), Some(id));
                }
                let child = appproxy_shared::context::spawn_local(async move {
                    futures_lite::future::yield_now().await;
                    current_request_id()
                });
                assert_eq!(child.await, Some(id));
                i
            })));
        }
        let mut seen = 0;
        for t in tasks {
            seen += t.await + 1;
        }
        assert_eq!(seen, TASKS * (TASKS + 1) / 2);
        assert_eq!(current_request_id(), None);
    });
}

#[test]
fn nested_scopes_restore_the_outer_id() {
    let outer: RequestId = "outer".parse().expect("valid");
    let inner: RequestId = "inner".parse().expect("valid");
    futures_lite::future::block_on(scope(Some(outer), async move {
        assert_eq!(current_request_id(), Some(outer));
        scope(Some(inner), async move {
            assert_eq!(current_request_id(), Some(inner));
        })
        .await;
        assert_eq!(current_request_id(), Some(outer));
        let inherited = inherit(async { current_request_id() });
        assert_eq!(inherited.request_id(), Some(outer));
        assert_eq!(inherited.await, Some(outer));
    }));
    assert_eq!(current_request_id(), None);
}

#[test]
fn background_jobs_get_fresh_ids() {
    let a =
        futures_lite::future::block_on(background(IdVersion::V7, async { current_request_id() }));
    let b =
        futures_lite::future::block_on(background(IdVersion::V7, async { current_request_id() }));
    assert!(a.is_some() && b.is_some());
    assert_ne!(a, b);
    assert_eq!(current_request_id(), None);
}
