# The "slowclients" scenario's Rack app (bench/scenarios/slowclients.py): what a proxy in front of
# unicorn must buffer both ways.
#   /fast    a tiny answer (the requests whose latency is measured)
#   /upload  reads the whole body in 1 MiB pieces (never holding it whole, so a 1 GiB upload
#            costs unicorn no memory) and answers "<size> <sha256>"
#   /big     an 8 MiB answer with Content-Length (what slow readers ask for)
require "digest"

FAST = "ok\n"
FAST_HEADERS = {
  "content-type" => "text/plain",
  "content-length" => FAST.bytesize.to_s,
}.freeze
BIG = ("0123456789abcdef" * 65536 * 8).freeze # 8 MiB
BIG_HEADERS = {
  "content-type" => "application/octet-stream",
  "content-length" => BIG.bytesize.to_s,
}.freeze

run(lambda do |env|
  case env["PATH_INFO"]
  when "/big"
    [200, BIG_HEADERS.dup, [BIG]]
  when "/upload"
    input = env["rack.input"]
    digest = Digest::SHA256.new
    size = 0
    buf = String.new(capacity: 1 << 20)
    while input.read(1 << 20, buf)
      size += buf.bytesize
      digest.update(buf)
    end
    body = "#{size} #{digest.hexdigest}\n"
    [200, {"content-type" => "text/plain", "content-length" => body.bytesize.to_s}, [body]]
  else
    [200, FAST_HEADERS.dup, [FAST]]
  end
end)
