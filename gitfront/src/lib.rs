//! gitfront: an ssh forced command that accepts only `git push` and turns each
//! pushed branch into a microVM job on Nomad. (Being built; see issue 4.)
