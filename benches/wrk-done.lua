-- Prints wrk's totals in the line the scripts read: `BENCH requests=N p99=µs`.
done = function(summary, latency, requests)
  io.write(string.format("BENCH requests=%d p99=%d\n", summary.requests, latency:percentile(99)))
end
