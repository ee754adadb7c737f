//! Consul's membership endpoints (`/v1/agent/members|join|leave|force-leave`) over the node's
//! LAN gossip pool.

use crate::api::{ClusterOpError, ClusterOps};
use crate::gossip::{Gossip, Member, MemberStatus};
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// How long a join waits for the member it was given to answer.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Membership operations of a clustered node.
pub struct GossipOps {
    /// The node's LAN pool.
    pub gossip: Gossip,
    /// A server's WAN pool (the servers of every datacenter); `None` on agents.
    pub wan: Option<Gossip>,
}

#[async_trait::async_trait]
impl ClusterOps for GossipOps {
    async fn join(&self, addr: &str) -> Result<(), ClusterOpError> {
        let target: SocketAddr = match addr.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => match addr.parse::<std::net::IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, 8301),
                Err(_) => addr
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| ClusterOpError::Failed(format!("cannot resolve {addr:?}")))?,
            },
        };
        self.gossip.join(&[target], JOIN_TIMEOUT).await.map(|_| ()).map_err(|e| ClusterOpError::Failed(e.to_string()))
    }

    async fn leave(&self) -> Result<(), ClusterOpError> {
        self.gossip.leave().await.map_err(|e| ClusterOpError::Failed(e.to_string()))
    }

    async fn force_leave(&self, node: &str, _prune: bool) -> Result<(), ClusterOpError> {
        // A failed member already counts as gone here (its node is critical, its tasks are
        // unreachable and replaced by their apps' strategy); a live one cannot be forced out.
        let members = self.gossip.members();
        let Some(m) = members.iter().find(|m| m.name == node) else {
            return Err(ClusterOpError::UnknownNode(node.to_owned()));
        };
        match m.status {
            MemberStatus::Failed | MemberStatus::Left => Ok(()),
            _ => Err(ClusterOpError::Failed(format!("{node} is alive: only a failed member can be forced to leave"))),
        }
    }

    fn members(&self) -> Vec<Member> {
        self.gossip.members()
    }

    fn wan_members(&self) -> Option<Vec<Member>> {
        self.wan.as_ref().map(Gossip::members)
    }
}
