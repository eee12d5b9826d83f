# The seed experiment's Rack app: a fast action and a sleep-based slow action. The slow action
# lives on its own paths (/reports/ID?ms=N, as a real app's reports differ from its items);
# /slow?ms=N is the same action under its old name.
# Every response names the host that served it (X-Served-By), so the client can count
# the requests a front sent to another host.
HOST = ENV.fetch("BENCH_HOST", "?")
BODY = "ok\n"
HEADERS = {
  "content-type" => "text/plain",
  "content-length" => BODY.bytesize.to_s,
  "x-served-by" => HOST,
}.freeze

run(lambda do |env|
  path = env["PATH_INFO"]
  if path == "/slow" || path.start_with?("/reports/")
    ms = env["QUERY_STRING"].to_s[/ms=(\d+)/, 1]
    sleep((ms ? ms.to_i : 100) / 1000.0)
  end
  [200, HEADERS.dup, [BODY]]
end)
