//! Scenario tests: joins, leaves, churn and partial slots over time, on the real assigner.
